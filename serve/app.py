"""The typed Ray Serve app builder.

    serve run serve.app:app model=smollm2-135m policy=policy.json
    serve run serve.app:app model=smollm2-135m study=S db=sqlite:///ffnskip.db
    serve deploy serve/config.yaml

Ray Serve validates the ``key=value`` arguments (or the ``args:`` of the config file) into
:class:`~serve.config.ServeArgs`. The start-up policy is resolved here, once (file read, or the
study's best trial looked up in the store), and handed to every replica.
"""

# No ``from __future__ import annotations``: Ray Serve reads the builder's annotation as a class.
from ray.serve import Application

from .config import ServeArgs
from .policies import startup_entry


def app(args: ServeArgs) -> Application:
    from ffnskip.loading import resolve_model

    from .deployment import build_application

    if isinstance(args, dict):  # called directly with a plain dict
        args = ServeArgs.model_validate(args)
    resolve_model(args.model)  # an unknown model fails here, not in every replica
    return build_application(args, startup_entry(args))
