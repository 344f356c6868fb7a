"""A start-up check that the Triton kernels agree with their torch references on a device.

Legend: T tokens, D model dim, E experts, K top-k, R dispatched rows, F expert hidden.

``moe.kernel_backend=auto`` selects the kernels on CUDA only after this check has passed
on that device, once per process (:func:`kernels_verified`). It runs every op of
:mod:`moetrain.kernels.ops` forward and backward on a small problem (float32, and bfloat16
for the row kernels) with awkward sizes (D and F not powers of two, an expert with no
tokens, a capacity that drops rows, inactive slots under the ``probs`` drop policy) and
compares with :mod:`moetrain.kernels.reference`: integer outputs exactly, floating ones
within 1e-4 relative (2e-2 in bfloat16). A kernel
that fails to compile, or that computes something else on this GPU, triton or driver, then
costs speed, not correctness: ``auto`` keeps the torch path and warns with the op and the
error. The check takes milliseconds after compilation and draws no random numbers from
torch's global generators.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

log = logging.getLogger(__name__)

__all__ = ["kernels_verified", "run_selftest"]

_T, _K, _E, _D, _F = 96, 3, 8, 80, 56
# Relative error allowed: float32 differs only in summation order; bfloat16 by a rounding
# (the kernels round once from float32 where the torch path may round twice).
_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _close(name: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        failures.append(f"{name}: shape/dtype {tuple(got.shape)}/{got.dtype}, "
                        f"expected {tuple(want.shape)}/{want.dtype}")
        return
    if got.is_floating_point():
        tol = _TOL.get(got.dtype, _TOL[torch.float32])
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err <= tol:  # also catches NaN
            failures.append(f"{name}: relative error {err:.2e} > {tol:g}")
    elif not torch.equal(got, want):
        failures.append(f"{name}: {int((got != want).sum())} entries differ")


def _inputs(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1234)
    # Distinct logits 0.05 apart in each row: no near-ties, so top-k is unambiguous.
    logits = torch.stack([torch.randperm(_E, generator=g) for _ in range(_T)]).float() * 0.05
    logits[:, _E - 1] = -30.0  # the last expert receives no tokens
    out = {
        "logits_TE": logits,
        "bias_E": torch.linspace(-0.01, 0.01, _E),
        "x_TD": torch.randn(_T, _D, generator=g),
        "grad_TD": torch.randn(_T, _D, generator=g),
        "a_RF": 3 * torch.randn(_T * _K, _F, generator=g),
        "b_RF": torch.randn(_T * _K, _F, generator=g),
        "grad_RF": torch.randn(_T * _K, _F, generator=g),
    }
    return {k: v.to(device) for k, v in out.items()}


def _grads(fn, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of ``fn`` and the gradients of its floating inputs for the given cotangents."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    torch.autograd.backward([o for o, _ in diff], [g for _, g in diff])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def _check_router(t: dict, sigmoid: bool, failures: list[str]) -> None:
    from moetrain.kernels import ops
    from moetrain.kernels import reference as ref

    kind, device = ("sigmoid" if sigmoid else "softmax"), t["logits_TE"].device
    bias = t["bias_E"] if sigmoid else None
    g_w = torch.linspace(-1, 1, _T * _K, device=device).view(_T, _K)
    g_s = torch.cos(torch.arange(_T * _E, device=device, dtype=torch.float32)).view(_T, _E)
    cot = [None, g_w, g_s]
    got = _grads(lambda z: ops.topk_router(z, bias, _K, sigmoid, True, 1.3), [t["logits_TE"]],
                 cot)
    want = _grads(lambda z: ref.topk_router_ref(z, bias, _K, sigmoid, True, 1.3),
                  [t["logits_TE"]], cot)
    for name, a, b in zip(("ids", "weights", "scores", "grad_logits"), got, want):
        _close(f"topk_router[{kind}].{name}", a, b, failures)


def _check_dispatch(t: dict, capacity: int | None, dtype: torch.dtype,
                    failures: list[str], variable_k: bool = False) -> None:
    """Routing, permute and combine; ``variable_k`` adds inactive slots (NaN weights there,
    which must never be read) and the ``probs`` drop policy."""
    from moetrain.kernels import ops
    from moetrain.kernels import reference as ref

    from moetrain.config.schema import DropPolicy

    tag, device = f"capacity={capacity},{str(dtype)[6:]}", t["x_TD"].device
    x_TD, grad_TD = t["x_TD"].to(dtype), t["grad_TD"].to(dtype)
    ids_TK, w_route, _ = ref.topk_router_ref(t["logits_TE"], None, _K, False, True)
    w_TK = torch.linspace(0.1, 1.0, _T * _K, device=device).view(_T, _K)
    how = {}
    if variable_k:
        tag += ",probs,inactive"
        active_TK = (torch.arange(_T * _K, device=device) % 5 != 0).view(_T, _K)
        w_TK = torch.where(active_TK, w_TK, float("nan"))
        how = {"policy": DropPolicy.probs, "weights_TK": w_route, "active_TK": active_TK}
    meta = ops.routing_metadata(ids_TK, _E, capacity, **how)
    want = ref.routing_metadata_ref(ids_TK, _E, capacity, **how)
    for field in ("row_index_R", "pos_TK", "tokens_per_expert", "counts_E"):
        _close(f"routing_metadata[{tag}].{field}", getattr(meta, field), getattr(want, field),
               failures)
    index, pos = want.row_index_R, want.pos_TK
    g_rows = torch.sin(torch.arange(index.numel() * _D, device=device, dtype=torch.float32))
    g_rows = g_rows.view(-1, _D).to(dtype)
    rows = _grads(lambda x: ops.permute(x, index, pos, _K), [x_TD], [g_rows])
    rows_ref = _grads(lambda x: ref.permute_ref(x, index, _K), [x_TD], [g_rows])
    for name, a, b in zip(("rows", "grad_x"), rows, rows_ref):
        _close(f"permute[{tag}].{name}", a, b, failures)
    got = _grads(lambda y, w: ops.unpermute_combine(y, w, pos), [rows_ref[0], w_TK],
                 [grad_TD])
    ref_out = _grads(lambda y, w: ref.unpermute_combine_ref(y, w, pos), [rows_ref[0], w_TK],
                     [grad_TD])
    for name, a, b in zip(("out", "grad_rows", "grad_weights"), got, ref_out):
        _close(f"unpermute_combine[{tag}].{name}", a, b, failures)


def _check_swiglu(t: dict, dtype: torch.dtype, failures: list[str]) -> None:
    from moetrain.kernels import ops
    from moetrain.kernels import reference as ref

    args = [t["a_RF"].to(dtype), t["b_RF"].to(dtype)]
    got = _grads(ops.swiglu, args, [t["grad_RF"].to(dtype)])
    want = _grads(ref.swiglu_ref, args, [t["grad_RF"].to(dtype)])
    for name, a, b in zip(("out", "grad_a", "grad_b"), got, want):
        _close(f"swiglu[{str(dtype)[6:]}].{name}", a, b, failures)


def run_selftest(device: torch.device) -> list[str]:
    """Every op against its reference on ``device``; the list of disagreements (empty: ok).

    A compile or launch error counts as a disagreement of the ops it stopped.
    """
    failures: list[str] = []
    t = _inputs(device)
    checks = [(f"topk_router[{k}]", functools.partial(_check_router, t, k == "sigmoid"))
              for k in ("softmax", "sigmoid")]
    f32, bf16 = torch.float32, torch.bfloat16
    checks += [(f"dispatch[capacity={c},{str(d)[6:]}]",
                functools.partial(_check_dispatch, t, c, d))
               for c, d in ((None, f32), (20, f32), (None, bf16))]
    checks += [("dispatch[capacity=20,float32,probs,inactive]",
                functools.partial(_check_dispatch, t, 20, f32, variable_k=True))]
    checks += [(f"swiglu[{str(d)[6:]}]", functools.partial(_check_swiglu, t, d))
               for d in (f32, bf16)]
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name, check in checks:
            try:
                check(failures)
            except Exception as exc:  # noqa: BLE001 -- a compile or launch error is a failure
                failures.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    return failures


# (device type, index) -> whether the kernels passed there. A plain dict, not
# functools.cache: torch.compile traces a lookup in it, and never the self-test itself.
VERDICTS: dict[tuple[str, int | None], bool] = {}


def kernels_verified(device_type: str, index: int | None) -> bool:
    """Whether the kernels passed :func:`run_selftest` on this device (run once per process).

    On failure, warns naming each op that disagreed, and returns False: ``auto`` then keeps
    the torch path on this device.
    """
    key = (device_type, index)
    if key in VERDICTS:
        return VERDICTS[key]
    device = torch.device(device_type, index)
    try:
        failures = run_selftest(device)
    except Exception as exc:  # noqa: BLE001 -- e.g. triton missing a backend for this GPU
        failures = [f"{type(exc).__name__}: {exc}"]
    if failures:
        warnings.warn(
            f"moe.kernel_backend=auto: the Triton MoE kernels disagree with their torch "
            f"references on {device}, so the torch path runs instead (slower, same math). "
            f"Failures: {'; '.join(failures)[:2000]}. Run `pytest tests/gpu` and report it; "
            f"set moe.kernel_backend=torch to silence this.", RuntimeWarning, stacklevel=2)
    else:
        log.info("Triton MoE kernels verified against their references on %s", device)
    VERDICTS[key] = not failures
    return VERDICTS[key]
