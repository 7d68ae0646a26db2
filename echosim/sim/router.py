"""The router in front of the replicas: picks one replica per arriving request, instantly."""

from __future__ import annotations

from echosim.sim.workload import Request


class Router:
    """round_robin: in turn; least_outstanding: fewest running + waiting requests; least_kv: lowest share of its KV
    cache in use; prefix: the replica whose prefix cache holds the longest prefix of the request, then fewest
    outstanding (a request without prefix keys goes by fewest outstanding). Ties go to the lowest index."""

    def __init__(self, replicas: list, policy: str):
        self.replicas, self.policy = replicas, policy
        self._next = 0
        self.routed = [0] * len(replicas)

    def submit(self, req: Request) -> None:
        reps = self.replicas
        if len(reps) == 1:
            i = 0
        elif self.policy == "round_robin":
            i = self._next
            self._next = (i + 1) % len(reps)
        elif self.policy == "prefix":
            keys, sizes = req.prefix_keys, req.prefix_sizes
            i = min(range(len(reps)), key=lambda j: (-(reps[j].cache.peek(keys, sizes) if keys and reps[j].cache
                                                        is not None else 0), reps[j].outstanding, j))
        elif self.policy == "least_outstanding":
            i = min(range(len(reps)), key=lambda j: reps[j].outstanding)
        else:  # least_kv: the KV the replica holds, plus what its queue will need, as a share of its capacity
            i = min(range(len(reps)), key=lambda j: (reps[j].kv_use + reps[j].queued_kv_share(), j))
        self.routed[i] += 1
        reps[i].submit(req)
