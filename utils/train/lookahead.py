"""Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back") around any
of our optimizers: the inner optimizer moves the fast weights (the model's parameters); after
every k-th step taken, slow weights move alpha of the way to them and the fast weights restart
from the slow ones. The inner optimizer's state (momentum, Adam's moments) carries on, as in the
paper's experiments."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch

from utils.errors import UserError

DEFAULT_K, DEFAULT_ALPHA = 5, 0.5


def lookahead_settings(values: list[str] | tuple) -> tuple[int, float]:
    """--lookahead's K and ALPHA (defaults 5 and 0.5 for those not given), checked."""
    if len(values) > 2:
        raise UserError(f"--lookahead takes at most two values, K and ALPHA; got {' '.join(map(str, values))}")
    given = [*values, *(DEFAULT_K, DEFAULT_ALPHA)[len(values) :]]
    try:
        k, alpha = int(given[0]), float(given[1])
    except ValueError:
        raise UserError(
            f"--lookahead K ALPHA: K a whole number, ALPHA a number; got {' '.join(map(str, values))}"
        ) from None
    if k < 1 or not 0.0 < alpha <= 1.0:
        raise UserError(f"--lookahead K ALPHA needs K >= 1 and 0 < ALPHA <= 1; got K={k}, ALPHA={alpha:g}")
    return k, alpha


class LookaheadAction(argparse.Action):
    """--lookahead [K [ALPHA]] on the command line: (K, ALPHA) with the defaults filled in; () when absent."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: list[str],
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, lookahead_settings(values))
        except UserError as error:
            parser.error(str(error))


class Lookahead:
    """An optimizer that is `optimizer` with Lookahead around it.

    It shares the inner optimizer's param_groups, so the learning-rate schedule and the GradScaler
    (which unscales and checks the gradients of these groups) act on the inner optimizer, and
    step() counts only the steps actually taken: GradScaler does not call it for a skipped fp16
    step. state_dict() is the inner optimizer's with a 'lookahead' entry: k, alpha, the steps
    taken since the last synchronisation and the slow weights, so a resume in the middle of a
    k-cycle continues it exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = DEFAULT_K, alpha: float = DEFAULT_ALPHA):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.steps = 0  # steps taken since the last synchronisation

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's (a property: its load_state_dict() replaces the list)."""
        return self.optimizer.param_groups

    def step(self, closure: Callable | None = None) -> torch.Tensor | None:
        """The inner optimizer's step; after every k-th, the synchronisation."""
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps >= self.k:
            self.synchronise()
        return loss

    @torch.no_grad()
    def synchronise(self) -> None:
        """slow += alpha * (fast - slow); fast = slow."""
        torch._foreach_lerp_(self.slow, [p.detach() for p in self.params], self.alpha)
        torch._foreach_copy_(self.params, self.slow)
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's (its parameters are the model's)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Inside the block the model's parameters hold the slow weights (its buffers are unchanged);
        after it, the fast weights again."""
        with torch.no_grad():
            fast = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.slow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, fast)

    def state_dict(self) -> dict:
        """The inner optimizer's state with Lookahead's own under "lookahead": K, ALPHA, the steps
        taken and the slow weights."""
        lookahead = {"k": self.k, "alpha": self.alpha, "steps": self.steps, "slow": self.slow}
        return {**self.optimizer.state_dict(), "lookahead": lookahead}

    def load_state_dict(self, state: dict) -> None:
        """Continue from what state_dict() returned; a state without Lookahead's entry is refused."""
        saved = state.get("lookahead")
        if saved is None or len(saved["slow"]) != len(self.slow):
            raise UserError("the checkpoint's optimizer has no Lookahead state for this model: it cannot resume it")
        if (int(saved["k"]), float(saved["alpha"])) != (self.k, self.alpha):
            raise UserError(
                f"the checkpoint's Lookahead has K={saved['k']}, ALPHA={saved['alpha']:g}, this run "
                f"K={self.k}, ALPHA={self.alpha:g}: it cannot continue its cycle"
            )
        self.optimizer.load_state_dict({k: v for k, v in state.items() if k != "lookahead"})
        with torch.no_grad():
            torch._foreach_copy_(self.slow, [t.to(s.device) for s, t in zip(self.slow, saved["slow"])])
        self.steps = int(saved["steps"])
