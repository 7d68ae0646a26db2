"""The acceptance model and its synthetic drafter: what the simulator drafts, and what the target agrees with.

Generative model, per decode step of a request with per-request difficulty z (drawn once, N(0, sigma_request)) and a
per-step latent w (drawn each step, N(0, sigma_step): some stretches of text are easier than others):

    ease e = skill[dataset] - z + w

Every expanded node gets k sorted, distinct candidates. Draft probabilities: the top one is
q1 = sigmoid(x1), x1 = conf_mean[d] + conf_ease * e + conf_sd * N(0, 1), so drafts are more confident where the
text is easier (a model fitted to records carries the records' quantiles of x1 per depth, for nodes on the
target's path and off it: x1 is then a normal score, mapped through the quantiles of the node's kind to a logit,
so the drafts keep their link to e and take the real drafter's shape on and off the path);
each further rank divides by exp(step), step = max(rank_decay + rank_sd * N(0, 1), 0.01), and the
ranks below the first are scaled down if needed so that the k candidates leave some mass to the rest of the
vocabulary.

Whether the target agrees is a sequential (continuation-ratio) choice over the children in rank order: child j is
the target's token, given that no elder sibling is, with hazard

    h_j = sigmoid(e + gamma[d] + beta[d] * logit(q~_j) + rank_bias * [j > 0]),   q~_j = q_j / (1 - sum_{i<j} q_i)

and no child at all with the remaining probability. With e = gamma = rank_bias = 0 and beta = 1 the drafter is
calibrated (P(child j is the target's token) = q_j). Exactly one child or none matches, by construction. beta[d] is
how well draft confidence separates at depth d (ECHO's sweet spots are the depths where it separates best),
gamma[d] how acceptance drifts with depth. Fitting (acceptance_fit.py): maximum likelihood from per-node records
(a logistic regression with two random effects, plus the draft logits), and the presets' per-dataset skills from
published MAT (benchmarks/fit_acceptance_presets.py).

Hot path: per depth, `expand` is a dozen vectorized NumPy ops over the whole frontier with two RNG calls, and it
records in a [B, S + 1] array which child rank (k = none) the target picks at each expanded node (column 0 is the
root), which `target_argmax` turns back into tokens. Tokens are a hash of (parent slot, depth) plus the
rank, so they are distinct among siblings and the "no match" token (base + K) equals no child.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echosim.sim.errors import SimError
from echosim.spec.drafting import draft
from echosim.spec.forest import DraftForest
from echosim.spec.pack import VerifyBatch, pack
from echosim.spec.verify import verify_greedy

PRESET_DIR = Path(__file__).parent / "presets"
FORMAT = "echosim-acceptance/1"
# logit(q~) is clipped here: draft probabilities are logged with ~6 significant digits, so beyond this a record can
# not tell values apart, and the generator must not use information the fit never sees.
X_CLIP = 13.8

# Dataset names as benchmarks and traces spell them -> the canonical name of a profile.
ALIASES = {
    "human_eval": "humaneval", "sum": "cnn_dm", "summarization": "cnn_dm", "cnndm": "cnn_dm",
    "cnn_dailymail": "cnn_dm", "math_reasoning": "gsm8k", "mtbench": "mt_bench",
}


def canonical_dataset(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace("/", "_").replace(" ", "_")
    return ALIASES.get(key, key)


@dataclass
class DraftParams:
    conf_mean: list[float] = field(default_factory=lambda: [1.0])  # per depth (last value repeats)
    conf_ease: float = 1.0   # how much the top draft logit moves with the ease e
    conf_sd: float = 1.5     # per-node noise of the top draft logit
    rank_decay: float = 1.2  # mean log-ratio between consecutive ranks
    rank_sd: float = 0.6
    conf_quantiles: list[list[float]] | None = None  # per depth: x1 at QUANTILE_PROBS (from records), or None;
                                                     # with them, x1's normal score moves with e - skill
    conf_quantiles_off: list[list[float]] | None = None  # the same below a node off the target's path
    share_quantiles: list[list[float]] | None = None  # per bin of the top draft's probability (SHARE_EDGES): the
                                                      # logit of each lower rank's share of the mass left, or None


# the probabilities at which a fitted model stores the quantiles of the top draft logit
QUANTILE_PROBS = (np.arange(32) + 0.5) / 32
# bins of the top draft's probability under which a fitted model stores the lower ranks' shares
SHARE_EDGES = np.array([0.3, 0.5, 0.7, 0.9, 0.97])


@dataclass
class AcceptParams:
    gamma: list[float] = field(default_factory=lambda: [0.0])  # per depth (last value repeats)
    beta: list[float] = field(default_factory=lambda: [1.0])   # per depth (last value repeats)
    rank_bias: float = 0.0
    sigma_request: float = 0.5  # sd of the per-request difficulty z
    sigma_step: float = 0.8     # sd of the per-step latent w


def _per_depth(values: list[float], depth_max: int = 64) -> np.ndarray:
    """Index 0 unused, index d = the value for depth d; depths past the list repeat its last value."""
    v = np.asarray(values, float)
    out = np.empty(depth_max + 1)
    out[1:] = v[np.minimum(np.arange(depth_max), len(v) - 1)]
    out[0] = out[1]
    return out


class AcceptanceModel:
    """Parameters of the synthetic drafter and the target's agreement, per model, with per-dataset skills."""

    def __init__(self, model: str, draft: DraftParams, accept: AcceptParams, skills: dict[str, float],
                 vocab_size: int = 32000, policy: dict | None = None, notes: str = "",
                 calibration: dict | None = None):
        if "default" not in skills:
            skills = {**skills, "default": float(np.mean(list(skills.values()))) if skills else 0.0}
        self.model = model
        self.draft_params = draft
        self.accept_params = accept
        self.skills = {canonical_dataset(k) if k != "default" else k: float(v) for k, v in skills.items()}
        self.vocab_size = int(vocab_size)
        self.policy = policy or {}        # the eagle3 setting the presets were calibrated under
        self.notes = notes
        self.calibration = calibration or {}
        self.datasets: list[str] = list(self.skills)
        self._index = {name: i for i, name in enumerate(self.datasets)}
        self._default = self._index["default"]
        self.skill = np.array([self.skills[n] for n in self.datasets])
        self._tables()

    def _tables(self) -> None:
        d, a = self.draft_params, self.accept_params
        self.conf_mean = _per_depth(d.conf_mean)
        # [depth_max + 1, Q]: quantiles of x1 per depth (row 0 unused), on and off the target's path, when fitted
        self.conf_q = _per_depth_rows(d.conf_quantiles)
        self.conf_q_off = _per_depth_rows(d.conf_quantiles_off) if self.conf_q is not None else None
        self.share_q = np.asarray(d.share_quantiles, np.float64) if d.share_quantiles else None
        self.gamma = _per_depth(a.gamma)
        self.beta = _per_depth(a.beta)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def known_presets(cls) -> list[str]:
        return sorted(p.stem for p in PRESET_DIR.glob("*.json"))

    @classmethod
    def preset(cls, model: str) -> AcceptanceModel:
        name = str(model).strip().lower().replace("_", "-").replace("llama3", "llama-3")
        path = PRESET_DIR / f"{name}.json"
        prefixed = [k for k in cls.known_presets() if k.startswith(name + "-")]
        if not path.is_file() and len(prefixed) == 1:  # "qwen3-235b" -> "qwen3-235b-a22b"
            path = PRESET_DIR / f"{prefixed[0]}.json"
        if not path.is_file():
            raise SimError(f"unknown acceptance preset {model!r}; known: {', '.join(cls.known_presets())}")
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> AcceptanceModel:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SimError(f"cannot read acceptance model: {exc.strerror}", path=str(path)) from None
        except json.JSONDecodeError as exc:
            raise SimError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path=str(path)) from None
        return cls.from_json(data, path=str(path))

    @classmethod
    def from_json(cls, data: dict, path: str | None = None) -> AcceptanceModel:
        def need(obj, key, kind, where):
            if not isinstance(obj, dict) or key not in obj:
                raise SimError("missing", path=path, field=f"{where}{key}")
            v = obj[key]
            if kind == "num":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise SimError(f"must be a number, not {v!r}", path=path, field=f"{where}{key}")
            elif kind == "list":
                if (not isinstance(v, list) or not v or
                        any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v)):
                    raise SimError("must be a non-empty list of numbers", path=path, field=f"{where}{key}")
            return v

        if not isinstance(data, dict):
            raise SimError("an acceptance model is a JSON object", path=path)
        dr, ac = data.get("draft"), data.get("accept")
        draft = DraftParams(conf_mean=need(dr, "conf_mean", "list", "draft."),
                            conf_ease=need(dr, "conf_ease", "num", "draft."),
                            conf_sd=need(dr, "conf_sd", "num", "draft."),
                            rank_decay=need(dr, "rank_decay", "num", "draft."),
                            rank_sd=need(dr, "rank_sd", "num", "draft."),
                            conf_quantiles=_quantiles(dr.get("conf_quantiles"), path, "conf_quantiles"),
                            conf_quantiles_off=_quantiles(dr.get("conf_quantiles_off"), path, "conf_quantiles_off"),
                            share_quantiles=_quantiles(dr.get("share_quantiles"), path, "share_quantiles",
                                                       rows=len(SHARE_EDGES) + 1))
        accept = AcceptParams(gamma=need(ac, "gamma", "list", "accept."), beta=need(ac, "beta", "list", "accept."),
                              rank_bias=need(ac, "rank_bias", "num", "accept."),
                              sigma_request=need(ac, "sigma_request", "num", "accept."),
                              sigma_step=need(ac, "sigma_step", "num", "accept."))
        for name in ("conf_sd", "rank_sd"):
            if getattr(draft, name) < 0:
                raise SimError("must be >= 0", path=path, field=f"draft.{name}")
        for name in ("sigma_request", "sigma_step"):
            if getattr(accept, name) < 0:
                raise SimError("must be >= 0", path=path, field=f"accept.{name}")
        ds = data.get("datasets")
        if not isinstance(ds, dict) or not ds:
            raise SimError("missing or empty (a map of dataset -> {\"skill\": number})", path=path,
                            field="datasets")
        skills = {name: need(v, "skill", "num", f"datasets.{name}.") for name, v in ds.items()}
        vocab = data.get("vocab_size", 32000)
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 64:
            raise SimError(f"must be an integer >= 64, not {vocab!r}", path=path, field="vocab_size")
        return cls(str(data.get("model", "custom")), draft, accept, skills, vocab_size=vocab,
                   policy=data.get("policy"), notes=str(data.get("notes", "")),
                   calibration=data.get("calibration"))

    def to_json(self) -> dict:
        d, a = self.draft_params, self.accept_params
        r = lambda x: round(float(x), 4)  # noqa: E731
        out = {"format": FORMAT, "model": self.model, "notes": self.notes, "vocab_size": self.vocab_size,
               "policy": self.policy,
               "draft": {"conf_mean": [r(x) for x in d.conf_mean], "conf_ease": r(d.conf_ease),
                         "conf_sd": r(d.conf_sd), "rank_decay": r(d.rank_decay), "rank_sd": r(d.rank_sd),
                         **{k: [[r(x) for x in row] for row in v] for k, v in (
                             ("conf_quantiles", d.conf_quantiles), ("conf_quantiles_off", d.conf_quantiles_off),
                             ("share_quantiles", d.share_quantiles))
                            if v}},
               "accept": {"gamma": [r(x) for x in a.gamma], "beta": [r(x) for x in a.beta],
                          "rank_bias": r(a.rank_bias), "sigma_request": r(a.sigma_request),
                          "sigma_step": r(a.sigma_step)},
               "datasets": {n: {"skill": r(s)} for n, s in self.skills.items()}}
        if self.calibration:
            out["calibration"] = self.calibration
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def with_skill(self, dataset: str, skill: float) -> AcceptanceModel:
        """A copy with one dataset's skill replaced (used by the preset calibration)."""
        skills = dict(self.skills)
        skills[canonical_dataset(dataset) if dataset != "default" else dataset] = float(skill)
        return AcceptanceModel(self.model, self.draft_params, self.accept_params, skills, self.vocab_size,
                               self.policy, self.notes, self.calibration)

    # ---- per-request ---------------------------------------------------------------------------------------
    def dataset_index(self, names) -> np.ndarray:
        """Names (one str or an array of str) -> int index into `datasets`; unknown or empty -> "default"."""
        if isinstance(names, str):
            return np.asarray(self._index.get(canonical_dataset(names), self._default), np.int64)
        arr = np.asarray(names, dtype=object)
        uniq, inv = np.unique(arr.astype(str), return_inverse=True)
        lut = np.array([self._index.get(canonical_dataset(u), self._default) for u in uniq], np.int64)
        return lut[inv].reshape(arr.shape)

    def sample_difficulty(self, n: int, dataset_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per-request difficulty z ~ N(0, sigma_request), drawn once when a request arrives (higher = harder).
        The dataset's mean level is its skill, applied at drafting time, so z = 0 is a typical request."""
        return rng.standard_normal(n) * self.accept_params.sigma_request

    def drafter(self, seed: int) -> SyntheticDrafter:
        return SyntheticDrafter(self, seed)


def _per_depth_rows(rows) -> np.ndarray | None:
    """Per-depth rows [D, Q] -> [65, Q] indexed by depth 1..64 (row 0 unused; the last row repeats)."""
    if not rows:
        return None
    q = np.asarray(rows, np.float64)
    return np.concatenate([q[:1], q, np.repeat(q[-1:], 64, axis=0)])[:65]


def _quantiles(v, path, name: str, rows: int | None = None) -> list[list[float]] | None:
    """draft.<name>: absent, or one non-decreasing list of len(QUANTILE_PROBS) numbers per depth (or per bin:
    exactly `rows` of them)."""
    if v is None:
        return None
    if rows is not None and (not isinstance(v, list) or len(v) != rows):
        raise SimError(f"must be a list of {rows} rows (one per bin of the top draft's probability)", path=path,
                        field=f"draft.{name}")
    ok = isinstance(v, list) and v and all(
        isinstance(row, list) and len(row) == len(QUANTILE_PROBS)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row)
        and all(a <= b for a, b in zip(row, row[1:], strict=False)) for row in v)
    if not ok:
        raise SimError(f"must be a list (per depth) of {len(QUANTILE_PROBS)} non-decreasing numbers", path=path,
                        field=f"draft.{name}")
    return [[float(x) for x in row] for row in v]


class SyntheticDrafter:
    """Implements echosim.spec.drafting.Drafter. Call set_batch before each draft(); target_argmax after pack()."""

    def __init__(self, model: AcceptanceModel, seed: int):
        self.m = model
        self.rng = np.random.default_rng(seed)
        d, a = model.draft_params, model.accept_params
        self._conf_ease, self._conf_sd = d.conf_ease, d.conf_sd
        self._decay, self._rank_sd = d.rank_decay, d.rank_sd
        self._on: np.ndarray | None = None  # bool [B, S + 1]: node on the target's path (column 0: the root)
        self._rank_bias, self._sigma_step = a.rank_bias, a.sigma_step
        self._ease: np.ndarray | None = None
        self._conf_shift: np.ndarray | None = None
        self._match: np.ndarray | None = None  # int16 [B, S + 1]: rank of the target's child, K = none
        self._S = 0
        self._K = 1

    def set_batch(self, difficulty: np.ndarray, dataset_index: np.ndarray) -> None:
        """The batch of the coming step: per-request difficulty and dataset index, [B] each."""
        difficulty = np.asarray(difficulty, float)
        w = self.rng.standard_normal(len(difficulty)) * self._sigma_step
        skill = self.m.skill[np.asarray(dataset_index, np.int64)]
        self._ease = (skill - difficulty + w).astype(np.float32)
        # the records' quantiles are of the whole population: its normal score is centred on the dataset's skill
        self._conf_shift = (-self._conf_ease * skill).astype(np.float32) if self.m.conf_q is not None else None
        self._match = None

    def _base(self, parent_slot: np.ndarray, depth) -> np.ndarray:
        """First token id of the children of a parent slot at `depth`; the K ids after it are theirs (and the
        last one, base + K, is the "no child matches" token)."""
        return ((parent_slot + 1) * self._K + depth * 7) % (self.m.vocab_size - self._K - 1)

    def expand(self, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._ease is None or len(self._ease) != forest.batch_size:
            raise RuntimeError("SyntheticDrafter.set_batch must be called with the step's batch before draft()")
        if self._match is None or depth == 1:  # a new forest: forget the previous step's choices
            self._S = forest.num_slots
            self._K = max(forest.k1, forest.k, k)
            self._match = np.full((forest.batch_size, self._S + 1), self._K, np.int16)
            if self.m.conf_q_off is not None:
                self._on = np.zeros((forest.batch_size, self._S + 1), bool)
                self._on[:, 0] = True
        m = self.m
        d = min(depth, len(m.conf_mean) - 1)
        F = len(rows)
        e = self._ease[rows][:, None]
        noise = self.rng.standard_normal((F, k), dtype=np.float32)
        u = self.rng.random(F, dtype=np.float32)

        # top draft logit x1 [F, 1]: log q1 = -softplus(-x1) (accurate in float32 for confident drafts)
        x1 = noise[:, :1] * self._conf_sd
        x1 += e * self._conf_ease + float(m.conf_mean[d])
        if self._conf_shift is not None:
            x1 += self._conf_shift[rows][:, None]
        if m.conf_q is not None:  # a normal score: the records' logit at that quantile
            from scipy.special import ndtr  # here, not at import: SciPy's import alone is ~0.4 s of CPU

            p = ndtr(x1).ravel()
            x1 = np.interp(p, QUANTILE_PROBS, m.conf_q[d]).astype(np.float32)[:, None]
            if m.conf_q_off is not None and depth > 1:  # below a parent that is not the target's token:
                up = forest.parent[rows, parents]     # the records' off-path marginal, drawn by the node's own
                on = self._on[rows, up + 1] & (self._match[rows, up + 1] == forest.slot_rank[parents])
                self._on[rows, parents + 1] = on      # noise (never accepted: its link to e would not show)
                off = np.flatnonzero(~on)
                x1[off, 0] = np.interp(ndtr(noise[off, 0]), QUANTILE_PROBS, m.conf_q_off[d])
        np.minimum(np.maximum(x1, -30.0, out=x1), 30.0, out=x1)
        top = -np.logaddexp(0.0, -x1)
        if k > 1 and m.share_q is not None:
            logp, xt = self._lower_ranks_from_shares(x1, top, noise[:, 1:])
        elif k > 1:
            # ranks below the top: q_j = q1 * exp(-a_j) * scale; r_j = q_j / (1 - q1) = odds1 * exp(-a_j) * scale
            a = noise[:, 1:] * self._rank_sd
            a += self._decay
            np.maximum(a, 0.01, out=a)
            log_r = x1 - a.cumsum(axis=1)
            r = np.exp(log_r)
            scale = np.minimum(1.0, 0.999 / r.sum(axis=1, keepdims=True))
            log_r += np.log(scale)
            r *= scale
            r_through = r.cumsum(axis=1)  # sum of r over ranks 1..j
            logp = np.concatenate((top, log_r - np.logaddexp(0.0, x1)), axis=1)  # log q_j = log r_j + log(1-q1)
            # logit(q~_j) = logit(r_j / (1 - sum_{1<=i<j} r_i)) = log r_j - log(1 - sum_{1<=i<=j} r_i)
            xt = np.concatenate((x1, log_r - np.log1p(-r_through)), axis=1)
        else:
            logp, xt = top, x1.copy()
        np.minimum(np.maximum(xt, -X_CLIP, out=xt), X_CLIP, out=xt)
        eta = xt * float(m.beta[d])
        eta += e + float(m.gamma[d])
        if k > 1 and self._rank_bias:
            eta[:, 1:] += self._rank_bias
        np.minimum(eta, 50.0, out=eta)
        survive = np.cumprod(1.0 / (1.0 + np.exp(eta)), axis=1)  # P(no match among ranks 0..j)
        self._match[rows, parents + 1] = (survive >= u[:, None]).sum(axis=1)
        tokens = self._base(parents, depth)[:, None] + np.arange(k)
        return tokens, logp

    def _lower_ranks_from_shares(self, x1: np.ndarray, top: np.ndarray, noise: np.ndarray):
        """(log q [F, k], conditional logits [F, k]) when the model stores the records' shares: rank j >= 1 takes a
        share s_j of the mass the ranks above it left, drawn from the records' quantiles for the top draft's
        probability bin (the records' own dependence, which a fixed ratio to q_1 misses: a confident draft's
        runner-up gets about a quarter of what is left, not all of it), and never more than the rank above."""
        F, k1 = noise.shape
        q0 = np.exp(top[:, 0].astype(np.float64))
        from scipy.special import ndtr  # here, not at import: SciPy's import alone is ~0.4 s of CPU

        u = ndtr(noise.astype(np.float64))
        xs = np.empty_like(u)
        b = np.searchsorted(SHARE_EDGES, q0)
        for i in np.unique(b):
            rows = b == i
            xs[rows] = np.interp(u[rows], QUANTILE_PROBS, self.m.share_q[i])
        share = 1.0 / (1.0 + np.exp(-xs))
        q = np.empty((F, k1 + 1))
        q[:, 0] = q0
        left = 1.0 - q0
        for j in range(1, k1 + 1):
            q[:, j] = np.minimum(share[:, j - 1] * left, q[:, j - 1])
            left = left - q[:, j]
        before = np.cumsum(q, axis=1) - q
        cond = np.clip(q / np.maximum(1.0 - before, 1e-12), 1e-12, 1 - 1e-12)
        xt = (np.log(cond) - np.log1p(-cond)).astype(np.float32)
        xt[:, 0] = x1[:, 0]
        logp = np.log(np.maximum(q, 1e-30)).astype(np.float32)
        logp[:, 0] = top[:, 0]
        return logp, xt

    def target_argmax(self, batch: VerifyBatch) -> np.ndarray:
        """The target's greedy next token at every packed node ([batch.tokens.size]; padding gets 0)."""
        T = batch.num_tokens
        out = np.zeros(batch.tokens.size, np.int64)
        if T == 0:
            return out
        req = np.repeat(np.arange(batch.batch_size), batch.tree_sizes)
        node = batch.node[:T]
        slot = np.where(node >= 0, node - req * self._S, -1)
        rank = self._match[req, slot + 1] if self._match is not None else self._K
        out[:T] = self._base(slot, batch.depth[:T].astype(np.int64) + 1) + rank
        return out


def synthetic_step(drafter, policy, z: np.ndarray, ds: np.ndarray, root_tokens: np.ndarray, kv_len: np.ndarray):
    """One decode iteration of the real core under the synthetic drafter: draft, select, pack, verify, observe."""
    drafter.set_batch(z, ds)
    forest = draft(drafter, policy, root_tokens, kv_len)
    sel = policy.select(forest)
    batch = pack(forest, sel, check=False)
    res = verify_greedy(batch, drafter.target_argmax(batch))
    policy.observe(forest, sel, res.accept_len)
    return forest, sel, batch, res


def measure_mat(model: AcceptanceModel, policy, dataset: str = "default", requests: int = 256, steps: int = 16,
                seed: int = 0, nodes: int = 16) -> dict:
    """MAT of `policy` under `model` on `dataset`, through the real scheduler core (draft, select, pack, greedy
    verify). Requests of equal output length: the pooled MAT (all tokens / all request-steps) weights a request by
    its number of steps, i.e. it is 1 / E_z[1 / mu(z)], mu(z) = mean tokens per step of a request of difficulty z.
    E_z is a Gauss-Hermite quadrature over z with `nodes` nodes; mu at each node is the mean over
    requests // nodes requests decoding together (one batch) for `steps` steps, so there is no small-sample bias.
    Also returns the verified drafts per request-step (pooled the same way)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    per_node = max(requests // nodes, 1)
    B = per_node * nodes
    z = np.repeat(x * model.accept_params.sigma_request, per_node)
    ds = np.full(B, model.dataset_index(dataset), np.int64)
    drafter = model.drafter(seed)
    zeros = np.zeros(B, np.int64)
    kv_len = np.full(B, 128, np.int64)
    tokens = np.zeros(B)
    verified = np.zeros(B)
    for _ in range(steps):
        forest, sel, batch, res = synthetic_step(drafter, policy, z, ds, zeros, kv_len)
        tokens += res.accept_len + 1
        verified += np.bincount(sel // max(forest.num_slots, 1), minlength=B) if len(sel) else 0
    mu = tokens.reshape(nodes, per_node).mean(axis=1) / steps
    ver = verified.reshape(nodes, per_node).mean(axis=1) / steps
    step_weight = w / mu  # request-steps per request of each difficulty, relative
    return {"mat": float(1.0 / step_weight.sum()),
            "verified_per_step": float((step_weight * ver).sum() / step_weight.sum()),
            "mat_by_difficulty": dict(zip(np.round(x * model.accept_params.sigma_request, 3).tolist(),
                                          np.round(mu, 4).tolist(), strict=True)),
            "request_steps": B * steps}
