"""The Ray Serve deployment (thin): one :class:`~serve.service.Service` per replica behind its
FastAPI routes, and a deployment-scoped actor that carries policy swaps to every replica.

``PUT /v1/policy`` reaches one replica; it writes the new policy to the ``policy_board`` actor and
applies it at once; the other replicas read the board every ``policy_sync_s`` seconds (and a
replica that starts later reads it at start-up). Versions are nanosecond timestamps, so they
keep increasing if the controller recreates the board. Without the board (``share_policy_swaps``
off, or the actor unavailable) a swap applies to the replica that received it only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve as rserve

from .config import ServeArgs
from .http import build_app
from .policies import PolicyEntry
from .service import Service

log = logging.getLogger("ray.serve")

BOARD = "policy_board"


class PolicyBoard:
    """The last swapped policy of the deployment (a Ray actor managed by the Serve controller)."""

    def __init__(self) -> None:
        self.version = 0
        self.entry: dict[str, Any] | None = None

    def get(self) -> tuple[int, dict[str, Any] | None]:
        return self.version, self.entry

    def put(self, entry: dict[str, Any]) -> int:
        self.version = max(self.version + 1, time.time_ns())
        self.entry = entry
        return self.version


@rserve.deployment(name="ffnskip", max_constructor_retry_count=2, graceful_shutdown_wait_loop_s=0.5,
                   graceful_shutdown_timeout_s=5, health_check_period_s=5, health_check_timeout_s=30)
@rserve.ingress()
class FFNSkipDeployment:
    def __init__(self, args: dict[str, Any], entry: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        self.service = Service.load(self.args, PolicyEntry.from_dict(entry))
        try:
            self.service.replica_id = rserve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - informational only
            pass
        self._board = None
        self._sync_task = None
        if self.args.share_policy_swaps:
            self._board = self._find_board()
            if self._board is not None:
                try:
                    version, shared = ray.get(self._board.get.remote(), timeout=30)
                    if shared:
                        self.service.apply_shared(version, PolicyEntry.from_dict(shared))
                except Exception as exc:  # noqa: BLE001 - the board is an optimisation
                    log.warning("ffnskip: cannot read the policy board: %s", exc)
                self.service.publish = self._publish
                self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    def __serve_build_asgi_app__(self):
        return build_app(self.service)

    def check_health(self) -> None:
        if not self.service.engine.alive:
            raise RuntimeError("the ffnskip engine thread is not running")

    def __del__(self):
        if self._sync_task is not None:
            self._sync_task.cancel()
        self.service.close()

    # ------------------------------------------------------------------ policy board
    def _find_board(self):
        for _ in range(20):
            try:
                return rserve.get_deployment_actor(BOARD)
            except ValueError:
                time.sleep(0.25)  # not registered yet
            except Exception as exc:  # noqa: BLE001
                log.warning("ffnskip: no policy board (%s); policy swaps stay on the replica that gets them", exc)
                return None
        log.warning("ffnskip: the policy board did not appear; policy swaps stay on the replica that gets them")
        return None

    async def _publish(self, entry: PolicyEntry) -> int | None:
        try:
            return await self._board.put.remote(entry.to_dict())
        except Exception as exc:  # noqa: BLE001
            log.warning("ffnskip: policy board write failed (%s); the swap applies to this replica only", exc)
            return None

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(self.args.policy_sync_s)
            try:
                version, shared = await self._board.get.remote()
                if shared and version > self.service.holder.version:
                    self.service.apply_shared(version, PolicyEntry.from_dict(shared))
                    log.info("ffnskip: applied policy %s from the board", shared.get("policy_id"))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - recreated board: look it up again
                try:
                    self._board = rserve.get_deployment_actor(BOARD)
                except Exception:  # noqa: BLE001
                    pass


def build_application(args: ServeArgs, entry: PolicyEntry):
    """The bound application: ``args`` (validated) and the resolved start-up policy ``entry``."""
    options: dict[str, Any] = dict(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.ray_max_ongoing_requests,
        max_queued_requests=args.proxy_queue,
        ray_actor_options={"num_cpus": args.num_cpus},
    )
    if args.share_policy_swaps:
        from ray.serve.config import DeploymentActorConfig

        options["deployment_actors"] = [DeploymentActorConfig(
            name=BOARD, actor_class="serve.deployment:PolicyBoardActor", actor_options={"num_cpus": 0})]
    return FFNSkipDeployment.options(**options).bind(args.model_dump(), entry.to_dict())


PolicyBoardActor = ray.remote(PolicyBoard)
