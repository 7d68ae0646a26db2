"""Fitting the acceptance model: to published MAT (one skill per dataset, by bracketed root finding over simulated
MAT) and to per-node records (maximum likelihood, see fit_records)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.sim.acceptance import AcceptanceModel, measure_mat, synthetic_step


@dataclass
class SkillFit:
    dataset: str
    target_mat: float
    skill: float
    simulated_mat: float
    evaluations: int


def calibrate_skill(model: AcceptanceModel, policy, dataset: str, target_mat: float, *, requests: int = 1024,
                    steps: int = 16, seed: int = 0, rel_tol: float = 0.003, max_evals: int = 14) -> SkillFit:
    """The skill of `dataset` at which `policy` reaches `target_mat`. Every evaluation uses the same seed (common
    random numbers), so simulated MAT is a smooth increasing function of the skill; the root is bracketed, then
    found by regula falsi with the Illinois fix (bisection's safety, a few evaluations)."""
    evals = 0

    def f(s: float) -> float:
        nonlocal evals
        evals += 1
        return measure_mat(model.with_skill(dataset, s), policy, dataset, requests, steps, seed)["mat"] - target_mat

    lo, hi = 0.0, 0.0
    f_lo = f_hi = f(0.0)
    step = 1.5
    while f_lo > 0 and evals < max_evals:  # too easy: move down
        hi, f_hi = lo, f_lo
        lo -= step
        f_lo = f(lo)
    while f_hi < 0 and evals < max_evals:  # too hard: move up
        lo, f_lo = hi, f_hi
        hi += step
        f_hi = f(hi)
    best = (lo, f_lo) if abs(f_lo) < abs(f_hi) else (hi, f_hi)
    side = 0
    while abs(best[1]) > rel_tol * target_mat and evals < max_evals and f_lo < 0 < f_hi:
        s = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        fs = f(s)
        if abs(fs) < abs(best[1]):
            best = (s, fs)
        if fs < 0:
            lo, f_lo = s, fs
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = s, fs
            if side == 1:
                f_lo /= 2
            side = 1
    return SkillFit(dataset, target_mat, float(best[0]), float(best[1] + target_mat), evals)


# ---- maximum likelihood from per-node records ---------------------------------------------------------------------
GRID_STEP = 0.1    # spacing of the latent grids (z, w and t = w - z)
Z_MAX = 3.0        # the request latent z lives on [-Z_MAX, Z_MAX]
W_MAX = 4.0        # the step latent w on [-W_MAX, W_MAX]
SIGMA_BOUNDS = (0.02, 2.5)
SMOOTH = 2.0       # penalty on differences of gamma and beta between neighbouring depths


def infer_parent_accepted(rec) -> np.ndarray:
    """For records without `parent_accepted`: depth-1 nodes hang from the (accepted) root; a deeper node's parent is
    the step's accepted node one depth up when their path probabilities chain (path = parent path x draft prob)."""
    _, g = np.unique(np.stack([rec.request, rec.step]), axis=1, return_inverse=True)
    g = g.ravel()
    D = int(rec.depth.max())
    acc_path = np.full((g.max() + 1, D + 1), np.nan)
    acc_path[g[rec.accepted], rec.depth[rec.accepted]] = rec.path_prob[rec.accepted]
    star = acc_path[g, np.maximum(rec.depth - 1, 0)]
    parent_path = rec.path_prob / np.maximum(rec.draft_prob, 1e-300)
    chained = np.isfinite(star) & (np.abs(parent_path - star) <= 2e-3 * star + 2e-6)
    return (rec.depth == 1) | chained


@dataclass
class _Obs:
    """Observations of the continuation-ratio model: one per verified child of an accepted parent whose elder
    siblings all missed. Sorted by (request, step, depth, rank)."""
    y: np.ndarray        # accepted
    x: np.ndarray        # logit(q~), clipped
    xs: np.ndarray       # the draft-density variable: x, or its normal score under the records' quantiles
    depth: np.ndarray
    ranked: np.ndarray   # rank > 0
    ds: np.ndarray       # dataset index
    step_start: np.ndarray   # offsets of each step group in the obs arrays
    req_start: np.ndarray    # offsets of each request in the step groups
    top_q: np.ndarray        # draft prob of rank-0 children of accepted parents (for the draft fit)
    top_depth: np.ndarray
    top_ds: np.ndarray
    top_step: np.ndarray     # step group of each
    rank_steps: np.ndarray   # log q_j - log q_{j+1} of consecutive verified siblings, j >= 1
    datasets: list[str]


def normal_scores(x: np.ndarray, depth: np.ndarray, quantiles: list[list[float]] | None) -> np.ndarray:
    """Top draft logits -> their normal scores under the per-depth quantiles (the inverse of the generator's
    map from a Gaussian score to a logit); x itself without quantiles."""
    from scipy.special import ndtri

    from echosim.sim.acceptance import QUANTILE_PROBS

    if not quantiles:
        return x
    out = np.empty(len(x))
    ramp = np.arange(len(QUANTILE_PROBS)) * 1e-9  # np.interp wants increasing points
    for d in np.unique(depth):
        sel = depth == d
        q = np.asarray(quantiles[min(int(d), len(quantiles)) - 1]) + ramp
        out[sel] = ndtri(np.interp(x[sel], q, QUANTILE_PROBS))
    return out


def _observations(rec, datasets: list[str], quantiles: list[list[float]] | None = None) -> _Obs:
    from echosim.sim.acceptance import X_CLIP, canonical_dataset

    pa = rec.parent_accepted if rec.parent_accepted is not None else infer_parent_accepted(rec)
    keep = np.nonzero(pa)[0]
    if rec.dataset is not None:
        names = np.array([canonical_dataset(n) if n else "default" for n in rec.dataset[keep]], object)
    else:
        names = np.full(len(keep), "default", object)
    ds = np.array([datasets.index(n) for n in names], np.int64) if len(keep) else np.zeros(0, np.int64)
    req, step = rec.request[keep], rec.step[keep]
    depth, rank = rec.depth[keep].astype(np.int64), rec.rank[keep].astype(np.int64)
    q, y = rec.draft_prob[keep], rec.accepted[keep]
    order = np.lexsort((rank, depth, step, req))
    req, step, depth, rank, q, y, ds = (a[order] for a in (req, step, depth, rank, q, y, ds))
    n = len(req)
    new_step = np.r_[True, (req[1:] != req[:-1]) | (step[1:] != step[:-1])] if n else np.zeros(0, bool)
    new_sib = np.r_[True, new_step[1:] | (depth[1:] != depth[:-1])] if n else np.zeros(0, bool)
    sib_id = np.cumsum(new_sib) - 1
    csum = np.cumsum(q)
    sib_first = np.nonzero(new_sib)[0]
    before = csum - q - (csum[sib_first] - q[sib_first])[sib_id]  # draft mass of the elder siblings
    qt = np.clip(q / np.maximum(1.0 - before, 1e-12), 1e-12, 1 - 1e-12)
    x = np.clip(np.log(qt) - np.log1p(-qt), -X_CLIP, X_CLIP)
    # drop the siblings after an accepted one: the target's token was already found
    hit_rank = np.full(sib_id.max() + 1 if n else 0, np.iinfo(np.int64).max)
    np.minimum.at(hit_rank, sib_id[y], rank[y])
    use = rank <= hit_rank[sib_id]
    step_id = np.cumsum(new_step) - 1
    # rank-0 children (draft model) and consecutive sibling ratios below the top
    top = (rank == 0)
    pair = np.r_[(~new_sib[1:]) & (rank[1:] == rank[:-1] + 1) & (rank[:-1] >= 1), False] if n else top
    rank_steps = np.log(np.maximum(q[pair], 1e-300)) - np.log(np.maximum(q[np.nonzero(pair)[0] + 1], 1e-300))
    # keep only usable obs; recompute group offsets
    idx = np.nonzero(use)[0]
    sid = step_id[idx]
    step_start = np.r_[0, np.nonzero(np.diff(sid))[0] + 1] if len(idx) else np.zeros(0, np.int64)
    step_req = req[idx][step_start]
    req_start = np.r_[0, np.nonzero(np.diff(step_req))[0] + 1] if len(idx) else np.zeros(0, np.int64)
    # map top nodes to the (compacted) step groups
    compact = np.full(step_id.max() + 1 if n else 0, -1)
    compact[sid[step_start]] = np.arange(len(step_start))
    top_idx = np.nonzero(top)[0]
    top_step = compact[step_id[top_idx]]
    ok = top_step >= 0
    return _Obs(y=y[idx].astype(float), x=x[idx], xs=normal_scores(x[idx], depth[idx], quantiles),
                depth=depth[idx], ranked=(rank[idx] > 0).astype(float),
                ds=ds[idx], step_start=step_start, req_start=req_start,
                top_q=q[top_idx][ok], top_depth=depth[top_idx][ok], top_ds=ds[top_idx][ok],
                top_step=top_step[ok], rank_steps=rank_steps, datasets=datasets)


class _Likelihood:
    """Marginal log-likelihood of the obs, integrating z (per request) and w (per step) on fixed grids, and its
    gradient (analytic). Parameters: skills[n_ds], gamma[2..D], beta[1..D], rank_bias, log sigma_r, log sigma_s,
    conf_mean[1..D], conf_ease, log conf_sd. The draft logit of every top-ranked child (x1, Gaussian given the ease)
    is part of the likelihood: draft confidence carries information about the latents, so leaving it out would
    bias the acceptance parameters (the latent would be correlated with a covariate)."""

    def __init__(self, obs: _Obs, D: int, centred: bool = False):
        from scipy.signal import fftconvolve

        self.conv = fftconvolve
        self.o, self.D = obs, D
        self.centred = centred  # the draft logit moves with the ease's deviation from its dataset's skill
        self.nds = len(obs.datasets)
        self.Az = int(np.ceil(Z_MAX / GRID_STEP))
        self.Bw = int(np.ceil(W_MAX / GRID_STEP))
        self.z = (np.arange(2 * self.Az + 1) - self.Az) * GRID_STEP
        self.w = (np.arange(2 * self.Bw + 1) - self.Bw) * GRID_STEP
        J = self.Az + self.Bw
        self.t = (np.arange(2 * J + 1) - J) * GRID_STEP  # t_j = w_b - z_a, j = b - a + 2 Az
        from echosim.sim.acceptance import X_CLIP
        self.top = np.nonzero((obs.ranked == 0) & (np.abs(obs.x) < X_CLIP - 1e-9))[0]  # draft-density terms

    def unpack(self, theta: np.ndarray):
        n, D = self.nds, self.D
        skill = theta[:n]
        gamma = np.r_[0.0, 0.0, theta[n:n + D - 1]]          # index by depth; gamma[1] = 0
        beta = np.r_[0.0, theta[n + D - 1:n + 2 * D - 1]]
        rank_bias = theta[n + 2 * D - 1]
        sr, ss = np.exp(theta[n + 2 * D]), np.exp(theta[n + 2 * D + 1])
        return skill, gamma, beta, rank_bias, sr, ss

    def unpack_draft(self, theta: np.ndarray):
        n, D = self.nds, self.D
        k = n + 2 * D + 2
        return np.r_[0.0, theta[k:k + D]], theta[k + D], np.exp(theta[k + D + 1])  # conf_mean[d], ease, sd

    @property
    def size(self) -> int:
        return self.nds + 3 * self.D + 4

    def __call__(self, theta: np.ndarray, posterior: bool = False):
        o = self.o
        skill, gamma, beta, rank_bias, sr, ss = self.unpack(theta)
        eta0 = skill[o.ds] + gamma[o.depth] + beta[o.depth] * o.x + rank_bias * o.ranked
        eta = eta0[:, None] + self.t[None, :]                                 # [n, T]
        sp = np.logaddexp(0.0, eta)
        ll = o.y[:, None] * eta - sp
        cm, ce, csd = self.unpack_draft(theta)
        top = self.top
        mu0 = cm[o.depth[top]] + (0.0 if self.centred else ce * skill[o.ds[top]])
        r0 = o.xs[top] - mu0
        ll[top] += -0.5 * ((r0[:, None] - ce * self.t[None, :]) / csd) ** 2 - np.log(csd) - 0.5 * np.log(2 * np.pi)
        l_s = np.add.reduceat(ll, o.step_start, axis=0)                      # [G, T]
        m_s = l_s.max(axis=1, keepdims=True)
        E = np.exp(l_s - m_s)
        lwz = -0.5 * (self.z / sr) ** 2
        lwz -= np.logaddexp.reduce(lwz)
        lww = -0.5 * (self.w / ss) ** 2
        lww -= np.logaddexp.reduce(lww)
        pw = np.exp(lww)
        C = np.maximum(self.conv(E, pw[::-1][None, :], mode="valid", axes=1), 1e-300)  # [G, 2Az+1], index c
        M = np.log(C[:, ::-1]) + m_s                                           # [G, A]: index a = 2Az - c
        K = np.add.reduceat(M, o.req_start, axis=0)                           # [R, A]
        Kw = K + lwz
        LR = np.logaddexp.reduce(Kw, axis=1)
        total = LR.sum()
        pr = np.exp(Kw - LR[:, None])                                          # [R, A]
        req_of_step = np.repeat(np.arange(len(o.req_start)), np.diff(np.r_[o.req_start, len(o.step_start)]))
        v = pr[req_of_step][:, ::-1] / C                                       # [G, c]
        P = E * np.maximum(self.conv(v, pw[None, :], mode="full", axes=1), 0.0)  # [G, T]: posterior of t
        P /= np.maximum(P.sum(axis=1, keepdims=True), 1e-300)
        step_of_obs = np.repeat(np.arange(len(o.step_start)), np.diff(np.r_[o.step_start, len(o.y)]))
        resid = o.y[:, None] - np.exp(eta - sp)                                # y - sigmoid(eta)
        g_eta = (P[step_of_obs] * resid).sum(axis=1)
        n, D = self.nds, self.D
        g = np.zeros(self.size)
        g[:n] = np.bincount(o.ds, g_eta, minlength=n)
        g[n:n + D - 1] = np.bincount(o.depth, g_eta, minlength=D + 1)[2:D + 1]
        g[n + D - 1:n + 2 * D - 1] = np.bincount(o.depth, g_eta * o.x, minlength=D + 1)[1:D + 1]
        g[n + 2 * D - 1] = (g_eta * o.ranked).sum()
        ez2 = (np.exp(lwz) * self.z ** 2).sum()
        g[n + 2 * D] = ((pr * self.z ** 2).sum() - len(pr) * ez2) / sr ** 2       # d/d log sigma_r
        Pw = pw[None, :] * np.maximum(self._pw_post(E, v), 0.0)
        Pw /= np.maximum(Pw.sum(axis=1, keepdims=True), 1e-300)
        ew2 = (pw * self.w ** 2).sum()
        g[n + 2 * D + 1] = ((Pw * self.w ** 2).sum() - len(Pw) * ew2) / ss ** 2  # d/d log sigma_s
        # draft-density terms: Gaussian in t, so their posterior expectations need E[t], E[t^2] per step
        m1, m2 = (P @ self.t)[step_of_obs[top]], (P @ self.t ** 2)[step_of_obs[top]]
        e_r = r0 - ce * m1                        # E[x - mu(t)]
        e_rt = r0 * m1 - ce * m2                  # E[(x - mu(t)) t]
        e_r2 = r0 ** 2 - 2 * ce * r0 * m1 + ce ** 2 * m2
        k = n + 2 * D + 2
        g[k:k + D] = np.bincount(o.depth[top], e_r, minlength=D + 1)[1:D + 1] / csd ** 2
        g[k + D] = ((0.0 if self.centred else skill[o.ds[top]] * e_r) + e_rt).sum() / csd ** 2
        g[k + D + 1] = (e_r2 / csd ** 2 - 1.0).sum()
        if not self.centred:
            g[:n] += np.bincount(o.ds[top], ce * e_r, minlength=n) / csd ** 2
        # smoothness penalty over depth
        gam, bet = gamma[1:D + 1], beta[1:D + 1]
        pen = SMOOTH * (np.sum(np.diff(gam) ** 2) + np.sum(np.diff(bet) ** 2))
        dg = np.zeros(D)
        dg[1:] += 2 * SMOOTH * np.diff(gam)
        dg[:-1] -= 2 * SMOOTH * np.diff(gam)
        db = np.zeros(D)
        db[1:] += 2 * SMOOTH * np.diff(bet)
        db[:-1] -= 2 * SMOOTH * np.diff(bet)
        g[n:n + D - 1] -= dg[1:]
        g[n + D - 1:n + 2 * D - 1] -= db
        if posterior:
            return total - pen, g, P
        return total - pen, g

    def _pw_post(self, E: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Unnormalized posterior weight of each w_b (times 1/pw): sum_c v[c] E[b + c]."""
        # correlation of each row of E with its own v: a row-wise FFT convolution with v reversed
        full = self.conv(E, v[:, ::-1], mode="full", axes=1)
        A = v.shape[1]
        return full[:, A - 1:A - 1 + len(self.w)]


@dataclass
class RecordsFit:
    model: AcceptanceModel
    report: dict


DRAFT_MARGINALS = ("empirical", "logit-normal")


def fit_records(rec, base: AcceptanceModel | None = None, name: str = "fitted",
                max_records: int = 1_000_000, seed: int = 0, draft_marginal: str = "logit-normal",
                rank_shares: bool = False) -> RecordsFit:
    """Maximum-likelihood parameters (skills, gamma, beta, rank_bias, sigma_request, sigma_step and the top draft
    logit's conf_mean, conf_ease, conf_sd) from per-node records, conditioning on the parent being accepted;
    rank_decay/rank_sd by moments. `base` supplies what records cannot (vocabulary, policy). Beyond `max_records`
    records, a random subset of whole requests is fitted (the likelihood's memory grows with the nodes).
    draft_marginal 'logit-normal': the parametric form alone (conf_* in logits); 'empirical': the top draft logit
    keeps the records' own distribution per depth, on and off the accepted path (top_logit_quantiles; conf_* are
    then in normal-score units, conf_mean[1] is 0 and the ease enters as its deviation from the dataset's skill, so
    the skill moves acceptance alone: calibrate_skill can then match a measured MAT without moving the drafter),
    for records of a tree that verifies every candidate (no policy filtered them). rank_shares: the lower ranks'
    draft probabilities also follow the records (rank_share_quantiles) instead of a fixed ratio to the top one;
    off by default, since `validate` judged it worse for ECHO on its own (docs/VALIDATION.md)."""
    from scipy.optimize import minimize

    from echosim.sim.acceptance import AcceptParams, DraftParams, canonical_dataset
    from echosim.sim.errors import SimError
    from echosim.spec.calibrate import auroc

    if len(rec) == 0:
        raise SimError("no records to fit")
    names = sorted({canonical_dataset(n) if n else "default" for n in rec.dataset}) \
        if rec.dataset is not None else ["default"]
    total_records = len(rec)
    if len(rec) > max_records:
        reqs = np.unique(rec.request)
        keep = np.random.default_rng(seed).permutation(reqs)[:max(1, int(len(reqs) * max_records / len(rec)))]
        rec = _subset(rec, np.isin(rec.request, keep))
    if draft_marginal not in DRAFT_MARGINALS:
        raise SimError(f"draft_marginal must be one of {', '.join(DRAFT_MARGINALS)}, not {draft_marginal!r}")
    D_all = int(rec.depth.max())
    quantiles = top_logit_quantiles(rec, D_all, on_path=True) if draft_marginal == "empirical" else None
    quantiles_off = top_logit_quantiles(rec, D_all, on_path=False) if quantiles else None
    shares = rank_share_quantiles(rec) if rank_shares else None
    obs = _observations(rec, names, quantiles)
    if len(obs.y) < 50 or obs.y.sum() < 5 or (1 - obs.y).sum() < 5:
        raise SimError(f"too few usable records to fit: {len(obs.y)} nodes with an accepted parent "
                        f"({int(obs.y.sum())} accepted); need at least 50 with 5 accepted and 5 rejected")
    D = int(obs.depth.max())
    # empirical: the normal score is centred on each dataset's skill and its depth-1 mean is 0, so the records' own
    # marginal comes back at depth 1 (every step drafts it: no selection) whatever the skill; deeper, the on-path
    # records are those of accepted parents and conf_mean[d] stays free to undo that selection
    centred = quantiles is not None
    lik = _Likelihood(obs, D, centred)
    nds = len(names)
    x_top = obs.xs[lik.top]
    cm0 = [float(np.mean(x_top[obs.depth[lik.top] == d])) if (obs.depth[lik.top] == d).any() else 1.0
           for d in range(1, D + 1)]
    sd0 = float(np.std(x_top)) if len(x_top) > 1 else 1.0
    theta0 = np.r_[np.zeros(nds), np.zeros(D - 1), np.ones(D), 0.0, np.log(0.5), np.log(0.5),
                   cm0, 0.5, np.log(max(sd0, 0.1))]
    lb, ub = np.log(SIGMA_BOUNDS[0]), np.log(SIGMA_BOUNDS[1])
    bounds = [(-12, 12)] * nds + [(-10, 10)] * (D - 1) + [(-5, 5)] * D + [(-10, 10), (lb, ub), (lb, ub)] + \
        [(0.0, 0.0) if centred else (-20, 20)] + [(-20, 20)] * (D - 1) + [(-5, 5), (np.log(0.01), np.log(20))]
    if centred:
        theta0[nds + 2 * D + 2:nds + 3 * D + 2] = 0.0

    def neg(theta):
        val, grad = lik(theta)
        return -val, -grad

    res = minimize(neg, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 500})
    theta = res.x
    ll, _, P = lik(theta, posterior=True)
    skill, gamma, beta, rank_bias, sr, ss = lik.unpack(theta)

    cm, conf_ease, conf_sd = lik.unpack_draft(theta)
    d0 = base.draft_params if base is not None else DraftParams()
    has_top = np.bincount(obs.depth[lik.top], minlength=D + 1)[1:D + 1] > 0
    conf_mean = [float(v) for v in _fill_nan(np.where(has_top, cm[1:D + 1], np.nan))] if has_top.any() \
        else _per_depth_list(d0.conf_mean, D)
    rank_decay, rank_sd = d0.rank_decay, d0.rank_sd
    if len(obs.rank_steps) >= 20:
        rank_decay, rank_sd = float(obs.rank_steps.mean()), float(obs.rank_steps.std())

    skills = dict(zip(names, skill.tolist(), strict=True))
    model = AcceptanceModel(
        name, DraftParams(conf_mean=conf_mean, conf_ease=float(conf_ease), conf_sd=float(conf_sd),
                          rank_decay=rank_decay, rank_sd=rank_sd,
                          conf_quantiles=quantiles[:D] if quantiles else None,
                          conf_quantiles_off=quantiles_off[:D] if quantiles_off else None,
                          share_quantiles=shares),
        AcceptParams(gamma=gamma[1:D + 1].tolist(), beta=beta[1:D + 1].tolist(), rank_bias=float(rank_bias),
                     sigma_request=float(sr), sigma_step=float(ss)),
        skills, vocab_size=base.vocab_size if base is not None else 32000,
        policy=base.policy if base is not None else None,
        notes=f"fitted by maximum likelihood from {len(rec)} per-node records (echosim fit-acceptance)")

    # fit quality: log-likelihood against a constant rate, per-depth and per-q~ calibration (prior predictive)
    n = len(obs.y)
    p0 = obs.y.mean()
    ll0 = n * (p0 * np.log(p0) + (1 - p0) * np.log(1 - p0))
    eta0 = skill[obs.ds] + gamma[obs.depth] + beta[obs.depth] * obs.x + rank_bias * obs.ranked
    # Predicted acceptance of each node given only its step's first draft (the depth-1 top child, drafted in
    # every step whatever the outcomes): t | x1 is Gaussian (conjugate), then integrate the hazard over it.
    step_of_obs = np.repeat(np.arange(len(obs.step_start)), np.diff(np.r_[obs.step_start, n]))
    first = obs.step_start  # each step's first obs is its depth-1, rank-0 child
    var_t = 1.0 / (1.0 / (sr ** 2 + ss ** 2) + conf_ease ** 2 / conf_sd ** 2)
    mu_first = cm[1] + (0.0 if centred else conf_ease * skill[obs.ds[first]])
    mean_t = var_t * conf_ease * (obs.xs[first] - mu_first) / conf_sd ** 2
    gx, gw = np.polynomial.hermite_e.hermegauss(24)
    t_nodes = mean_t[step_of_obs][:, None] + np.sqrt(var_t) * gx[None, :]
    pred = (1.0 / (1.0 + np.exp(-(eta0[:, None] + t_nodes)))) @ (gw / gw.sum())
    pc = np.clip(pred, 1e-12, 1 - 1e-12)
    ll1 = float(np.sum(obs.y * np.log(pc) + (1 - obs.y) * np.log(1 - pc)))  # acceptance only, latents integrated
    depth_rows = [{"depth": int(d), "nodes": int((obs.depth == d).sum()),
                   "observed": round(float(obs.y[obs.depth == d].mean()), 4),
                   "predicted": round(float(pred[obs.depth == d].mean()), 4)}
                  for d in range(1, D + 1) if (obs.depth == d).any()]
    qt = 1.0 / (1.0 + np.exp(-obs.x))
    edges = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0 + 1e-9])
    b = np.clip(np.searchsorted(edges, qt, side="right") - 1, 0, len(edges) - 2)
    q_rows = [{"q_range": f"{edges[i]:.1f}-{min(edges[i + 1], 1.0):.1f}", "nodes": int((b == i).sum()),
               "observed": round(float(obs.y[b == i].mean()), 4), "predicted": round(float(pred[b == i].mean()), 4)}
              for i in range(len(edges) - 1) if (b == i).any()]
    report = {"records": total_records, "records_used": len(rec), "nodes_used": n, "accepted": int(obs.y.sum()),
              "steps": len(obs.step_start), "requests": len(obs.req_start),
              "parent_accepted": "from records" if rec.parent_accepted is not None else "inferred",
              "converged": bool(res.success), "iterations": int(res.nit),
              "loglik_joint": round(float(ll), 2), "loglik_accept": round(float(ll1), 2),
              "loglik_constant_rate": round(float(ll0), 2), "pseudo_r2": round(float(1 - ll1 / ll0), 4),
              "auroc": round(auroc(eta0, obs.y.astype(bool)), 4),
              "by_depth": depth_rows, "by_q": q_rows}
    return RecordsFit(model, report)


def step_autocorrelation(rec) -> float | None:
    """Lag-1 autocorrelation, within requests, of the drafts accepted per verify step: how alike a request's
    consecutive steps are (hard stretches of text last). None with fewer than 20 consecutive pairs."""
    key = np.asarray(rec.request, np.int64) * 1_000_000 + np.asarray(rec.step, np.int64)
    keys, inv = np.unique(key, return_inverse=True)
    accepted = np.bincount(inv, np.asarray(rec.accepted, float))
    same = keys[1:] // 1_000_000 == keys[:-1] // 1_000_000
    if same.sum() < 20 or accepted[:-1][same].std() == 0 or accepted[1:][same].std() == 0:
        return None
    return float(np.corrcoef(accepted[:-1][same], accepted[1:][same])[0, 1])


def records_tree(rec) -> dict:
    """The static tree (eagle3 settings) that wrote `rec`: its depth, width and most nodes in one step."""
    _, per_tree = np.unique(np.c_[rec.step, rec.request], axis=0, return_counts=True)
    return {"steps": int(np.max(rec.depth)), "topk": int(np.max(rec.rank)) + 1,
            "num_draft_tokens": int(per_tree.max()) + 1}


def match_persistence(model: AcceptanceModel, rec, *, requests: int = 256, steps: int = 30, seed: int = 0,
                      max_evals: int = 10) -> tuple[AcceptanceModel, dict]:
    """The split of the latent variance between request (persistent) and step (fleeting) at which the records'
    own tree, drafted under the model, shows the records' step-to-step autocorrelation (step_autocorrelation); the
    total variance the likelihood found is kept. The likelihood alone leaves the split loose (the records' steps
    are correlated 0.3, its fits' 0.14), and a policy that drafts by confidence meets hard stretches again and
    again. Bisection with common random numbers; the model unchanged when the records show too few steps."""
    import copy

    from echosim.spec.policies import make_policy

    target = step_autocorrelation(rec)
    a = model.accept_params
    total = a.sigma_request ** 2 + a.sigma_step ** 2
    info = {"records_autocorrelation": target, "sigma_request_ml": a.sigma_request, "sigma_step_ml": a.sigma_step}
    if target is None or total <= 0:
        return model, info
    tree = records_tree(rec)
    datasets = [d for d in model.datasets if d != "default"] or ["default"]

    def with_split(sr: float) -> AcceptanceModel:
        m = copy.deepcopy(model)
        m.accept_params.sigma_request = sr
        m.accept_params.sigma_step = float(np.sqrt(max(total - sr * sr, 0.0)))
        m._tables()
        return m

    def autocorr(sr: float) -> float:
        got = step_autocorrelation(simulate_records(with_split(sr), make_policy("eagle3", tree), datasets,
                                                    requests, steps, seed))
        return got if got is not None else 0.0

    lo, hi = 0.0, float(np.sqrt(total))
    f_lo, f_hi = autocorr(lo) - target, autocorr(hi) - target
    if f_lo >= 0 or f_hi <= 0:  # out of reach: the nearer end
        best = lo if abs(f_lo) <= abs(f_hi) else hi
    else:
        for _ in range(max_evals):
            mid = 0.5 * (lo + hi)
            f = autocorr(mid) - target
            if f < 0:
                lo = mid
            else:
                hi = mid
        best = 0.5 * (lo + hi)
    out = with_split(best)
    info.update(sigma_request=out.accept_params.sigma_request, sigma_step=out.accept_params.sigma_step,
                model_autocorrelation=autocorr(best))
    return out, info


def top_logit_quantiles(rec, D: int, on_path: bool, min_nodes: int = 64) -> list[list[float]] | None:
    """Per depth 1..D, the quantiles (at QUANTILE_PROBS) of the top draft logit of the nodes expanded on the
    accepted path (on_path) or off it (rank-0 children whose parent is, or is not, accepted; depth 1 is always
    on it). The fit models the normal scores of the on-path logits (a Gaussian copula: the real marginal, the
    model's links to the latents) and the generator maps its Gaussian draws back through the quantiles of the
    node's kind. Depths with fewer than min_nodes take the nearest shallower depth's; None when no depth has
    enough. Representative when the records come from a tree that verifies every candidate (a static tree), not
    one a policy filtered."""
    from echosim.sim.acceptance import QUANTILE_PROBS, X_CLIP

    pa = rec.parent_accepted if rec.parent_accepted is not None else infer_parent_accepted(rec)
    q = np.clip(rec.draft_prob, 1e-12, 1 - 1e-12)
    x = np.clip(np.log(q) - np.log1p(-q), -X_CLIP, X_CLIP)
    rows: list[list[float] | None] = []
    for d in range(1, D + 1):
        sel = (rec.depth == d) & (rec.rank == 0) & (pa if on_path else ~pa)
        rows.append(np.quantile(x[sel], QUANTILE_PROBS).tolist() if sel.sum() >= min_nodes else None)
    known = [r for r in rows if r is not None]
    if not known:
        return None
    last = known[0]
    for i, r in enumerate(rows):
        rows[i] = last = r if r is not None else last
    return rows


def rank_share_quantiles(rec, min_nodes: int = 20) -> list[list[float]] | None:
    """Per bin of the top draft's probability (SHARE_EDGES), the quantiles (at QUANTILE_PROBS) of the logit of each
    lower-ranked child's share of the draft mass its elder siblings left, over the children of accepted parents
    (one parent per depth, so a step's nodes at one depth are siblings). A bin with fewer than min_nodes takes
    the quantiles of all of them; None with fewer than 64 lower-ranked children in all."""
    from echosim.sim.acceptance import QUANTILE_PROBS, SHARE_EDGES, X_CLIP

    pa = rec.parent_accepted if rec.parent_accepted is not None else infer_parent_accepted(rec)
    keep = np.nonzero(pa)[0]
    req, step, depth, rank, q = (np.asarray(a)[keep] for a in (rec.request, rec.step, rec.depth, rec.rank,
                                                                  rec.draft_prob))
    order = np.lexsort((rank, depth, step, req))
    req, step, depth, rank, q = (a[order] for a in (req, step, depth, rank, q))
    n = len(q)
    if n == 0:
        return None
    first = np.r_[True, (req[1:] != req[:-1]) | (step[1:] != step[:-1]) | (depth[1:] != depth[:-1])]
    group = np.cumsum(first) - 1
    starts = np.nonzero(first)[0]
    csum = np.cumsum(q)
    before = csum - q - (csum[starts] - q[starts])[group]
    lower = (rank >= 1) & (rank[starts][group] == 0)  # a lower rank with its top sibling in the records
    if lower.sum() < 64:
        return None
    s = np.clip(q[lower] / np.maximum(1.0 - before[lower], 1e-12), 1e-12, 1 - 1e-12)
    x = np.clip(np.log(s) - np.log1p(-s), -X_CLIP, X_CLIP)
    b = np.searchsorted(SHARE_EDGES, q[starts][group][lower])
    pooled = np.quantile(x, QUANTILE_PROBS).tolist()
    return [np.quantile(x[b == i], QUANTILE_PROBS).tolist() if (b == i).sum() >= min_nodes else pooled
            for i in range(len(SHARE_EDGES) + 1)]


def _subset(rec, mask: np.ndarray):
    import dataclasses

    return dataclasses.replace(rec, **{f.name: getattr(rec, f.name)[mask] for f in dataclasses.fields(rec)
                                       if getattr(rec, f.name) is not None})


def _per_depth_list(values, D: int) -> list[float]:
    v = list(values)
    return [v[min(i, len(v) - 1)] for i in range(D)]


def _fill_nan(v: np.ndarray) -> np.ndarray:
    """Depths with no data take the nearest shallower value (or the first known one)."""
    out = v.copy()
    known = np.nonzero(np.isfinite(out))[0]
    for i in range(len(out)):
        if not np.isfinite(out[i]):
            prev = known[known < i]
            out[i] = out[prev[-1]] if len(prev) else out[known[0]]
    return out


def simulate_records(model: AcceptanceModel, policy, datasets: list[str], requests: int = 64, steps: int = 40,
                     seed: int = 0):
    """Per-node records of `requests` requests (datasets round robin) decoding together for `steps` steps under
    `policy`, as the engine would log them: for tests of the fit, and for trying `echosim fit-acceptance`."""
    from echosim.spec.records import NodeRecords, step_records

    rng = np.random.default_rng(seed)
    names = np.array([datasets[i % len(datasets)] for i in range(requests)], object)
    ds = model.dataset_index(names)
    z = model.sample_difficulty(requests, ds, rng)
    drafter = model.drafter(seed + 1)
    zeros = np.zeros(requests, np.int64)
    kv = np.full(requests, 128, np.int64)
    ids = np.arange(requests, dtype=np.int64)
    parts = []
    for step in range(steps):
        forest, sel, batch, res = synthetic_step(drafter, policy, z, ds, zeros, kv)
        parts.append(step_records(forest, batch, res, step, ids, names))
    return NodeRecords.concat(parts)
