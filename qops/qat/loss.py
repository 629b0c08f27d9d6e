"""The losses QAT trains with (docs/qat.md#training): cross-entropy on labels, or distillation from the FP32
teacher (KL on the softened logits, the logits' relative MSE, and the relative MSE of further float outputs)."""

from __future__ import annotations


def as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def relative_mse(s, t):
    return ((s - t) ** 2).mean() / (t.pow(2).mean() + 1e-12)


def distill_loss(outs: list, teacher_outs: list, tau: float, logit_mse: float = 1.0):
    """KL divergence of the first output's softened distribution to the teacher's plus ``logit_mse`` times the
    logits' mean squared error relative to the teacher's mean square (KL alone lets every logit drift by the same
    constant), plus, for each further float output of the same shape (an embedding), its relative MSE: the
    student is held to everything the FP32 model serves, not only its top class."""
    import torch

    s, t = outs[0], teacher_outs[0]
    loss = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1),
                                      log_target=True, reduction="batchmean") * tau * tau
    if logit_mse:
        loss = loss + logit_mse * relative_mse(s, t)
    for s, t in zip(outs[1:], teacher_outs[1:]):
        if torch.is_floating_point(t) and s.shape == t.shape:
            loss = loss + relative_mse(s, t)
    return loss


def training_loss(model_outs: list, cfg, y=None, teacher_outs: list | None = None):
    """``cfg.loss`` (a :class:`~qops.qat.QatConfig`): cross-entropy on ``y``, or :func:`distill_loss`."""
    import torch

    if cfg.loss == "task":
        return torch.nn.functional.cross_entropy(model_outs[0], y)
    return distill_loss(model_outs, teacher_outs, cfg.temperature, cfg.logit_mse)
