"""The readiness gate: open it on a verified model, or on the node agent's seal."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from modelstore.mount import JuiceFSMount
from modelstore.sources import MountCounters
from modelstore.streamer import (
    BentoTree,
    CacheFiller,
    CachePurger,
)
from sidecar.agent import AgentChannel, AgentError, AgentUnreachable
from sidecar.cachewatch import CacheSpaceWatch
from sidecar.decisions import (
    GatePlan,
    gate_after_warmup,
    gate_unsealed,
)
from sidecar.env import Settings
from sidecar.metrics import SidecarMetrics
from sidecar.reporter import NORMAL, WARNING, Reporter, best_effort
from sidecar.verify import verify_model

log = structlog.get_logger("sidecar")


async def open_gate(
    settings: Settings,
    mount: BentoTree,
    reporter: Reporter,
    gate: GatePlan,
    counters: MountCounters | None = None,
    filler: CacheFiller | None = None,
    cache_watch: CacheSpaceWatch | None = None,
    metrics: SidecarMetrics | None = None,
    purger: CachePurger | None = None,
) -> None:
    """Verify the model if the gate plan says so, then set the condition to True.

    Any failure leaves the gate closed, with an Event and the condition
    False saying why.
    """
    metrics = metrics or SidecarMetrics()
    try:
        if gate.verify and not await verify_model(
            settings, mount, reporter, counters, filler, cache_watch, metrics, purger
        ):
            return
    except (OSError, ValueError) as err:
        # No manifest, an unreadable one, a file the mount cannot open...
        log.error("warmup.failed", error=str(err))
        metrics.warmup_failed("WarmupFailed")
        await reporter.event(WARNING, "WarmupFailed", f"cannot stream the model: {err}")
        await best_effort(reporter.set_condition("False", "WarmupFailed", str(err)[:256]))
        return
    gate = gate_after_warmup(
        gate,
        cache_watch is not None and cache_watch.full,
        cache_watch is not None and cache_watch.too_small,
    )
    # The one call that must land: retried until it does or the pod stops.
    await reporter.set_condition("True", gate.reason, gate.message, attempts=None)
    metrics.gate_opened()
    await reporter.event(
        NORMAL, "Ready", f"condition {settings.condition_type}=True: {gate.message}"
    )


async def verify_unsealed(
    settings: Settings,
    mount: JuiceFSMount,
    reporter: Reporter,
    gate: GatePlan,
    watch: CacheSpaceWatch,
    metrics: SidecarMetrics,
    refused: str,
) -> None:
    """The node agent could not seal the model: this pod streams and verifies it itself."""
    await watch.check("the node agent could not seal the model")
    unsealed = gate_unsealed(gate, watch.full)
    await reporter.event(
        WARNING,
        "VerifyingUnsealed",
        f"the node agent could not seal the model ({refused}); this pod streams and verifies "
        "it itself, reading what the node cache lacks from the object store",
    )
    await open_gate(
        settings, mount, reporter, unsealed, counters=MountCounters(mount), metrics=metrics
    )


@dataclass(frozen=True)
class SealOutcome:
    """What came of asking the node agent to seal."""

    # Why the agent refused (this pod then verifies what it reads itself);
    # None: sealed, or the warmup's time ran out (the gate stays closed).
    refused: str | None = None
    # Sealed, and the node's verified local copy serves the models: the
    # agent's bind of it is the pod's whole view, no JuiceFS mount is needed.
    served_copy: bool = False


async def open_gate_sealed(
    settings: Settings, agent: AgentChannel, reporter: Reporter, metrics: SidecarMetrics
) -> SealOutcome:
    """Node cache mode: the node agent opens the gate from its seal.

    The agent verified the Bento once on this node and is the only writer of
    the node cache this sidecar reads; it checks the Bento's bytes are there
    (warming it first if the node is cold) and sets the condition itself.
    Nothing is hashed here again.
    """
    started = time.monotonic()
    await reporter.event(
        NORMAL,
        "WarmupStarted",
        f"asking the node agent to seal {settings.bento_name}:{settings.bento_version} "
        "in the node cache (verified once per node; warmed first if the node is cold)",
    )
    sealing = agent.sibling(reply_timeout=None)
    try:
        async with asyncio.timeout(settings.warmup_timeout_seconds):
            served_copy = await _seal_until_answered(sealing, reporter)
    except (AgentError, TimeoutError) as err:
        message = str(err) or f"not sealed within {settings.warmup_timeout_seconds}s"
        log.error("seal.failed", error=message)
        metrics.warmup_failed("SealFailed")
        await reporter.event(
            WARNING, "SealFailed", f"the node agent did not seal the model: {message}"
        )
        if isinstance(err, TimeoutError):
            return SealOutcome()  # the warmup's time is up: the gate stays closed
        return SealOutcome(refused=message)
    finally:
        sealing.close()
    seconds = time.monotonic() - started
    metrics.gate_opened()
    log.info("seal.done", seconds=round(seconds, 2))
    await reporter.event(
        NORMAL,
        "ModelsReady",
        f"model sealed by the node agent in {seconds:.1f}s: verified once on this node and "
        "held on its disk (the models-ready condition says how the app reads it)",
    )
    # The agent set the condition; `kubectl describe pod` tells it as for a verified pod.
    await reporter.event(
        NORMAL,
        "Ready",
        f"condition {settings.condition_type}=True (ModelsSealed, by the node agent)",
    )
    return SealOutcome(served_copy=served_copy)


# Between asking a restarted node agent again to seal (it resumes the warm:
# the blocks already in the node cache are not fetched again).
SEAL_RETRY_SECONDS = 2.0


async def _seal_until_answered(sealing: AgentChannel, reporter: Reporter) -> bool:
    """Ask the agent to seal until one answers (AgentError: it refused); whether the
    node's local copy serves the models.

    An agent deleted or rolled mid-seal drops the connection; its successor
    gets the same request, so the warm resumes instead of leaving the gate
    closed until the pod is deleted. The caller's timeout bounds it.
    """
    while True:
        try:
            return await sealing.seal()
        except AgentUnreachable as err:
            log.warning("seal.interrupted", error=str(err))
            await reporter.event(
                WARNING,
                "SealInterrupted",
                f"the node agent went away while sealing ({err}); asking it again",
            )
        await asyncio.sleep(SEAL_RETRY_SECONDS)
