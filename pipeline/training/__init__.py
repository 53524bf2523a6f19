"""Training: one loop for the backbones (finetune, refine) and head training on cached features."""

from pipeline.stage import StageError


class NonFiniteLoss(StageError):
    """Training diverged: the loss became NaN or infinite. The run stops with this error and writes no manifest."""


def check_finite_loss(loss: float, epoch_or_where: str) -> float:
    """``loss`` itself, or :class:`NonFiniteLoss` naming where it diverged (every training loop calls this
    on the epoch's loss, after it is reduced over ranks, so that every rank stops together)."""
    import math

    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss} in {epoch_or_where}; lower --lr, or check the "
                            "inputs for extreme values")
    return loss
