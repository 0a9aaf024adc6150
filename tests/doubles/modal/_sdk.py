"""The SDK faces of the Modal DOUBLE: App, Image, Secret, Probe, Sandbox.

Names, parameter names, defaults and return shapes follow the real modal 1.6.4 (checked
by tests/test_modal_double.py against `inspect.signature` of the installed SDK), so that a
keyword the real SDK would refuse raises TypeError here too. Calls the real SDK offers
with an `.aio` twin (synchronicity's FunctionWithAio) have one here; the builders that
are plain functions in the real SDK (Image.*, Secret.from_*, Probe.with_tcp) are plain
here. Every call is recorded (see _double.record)."""
from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import os
import time
import warnings
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _double, exception
from ._tunnel import Tunnel

_NON_PYTHON_FILES = object()  # stands for the real default, modal.file_pattern_matcher.NON_PYTHON_FILES


# --- blocking call + .aio, like synchronicity's FunctionWithAio -----------------------------------

class FunctionWithAio:
    """`f(...)` blocks until the double's loop has run the call; `await f.aio(...)` waits
    for it without blocking the caller's loop. Arguments are bound (TypeError on a keyword
    the real SDK lacks) and the call recorded as soon as either is called."""

    def __init__(self, name: str, impl: Callable, bound: Any = None) -> None:
        self._name, self._impl, self._bound = name, impl, bound
        functools.update_wrapper(self, impl)
        sig = inspect.signature(impl)
        if bound is not None:
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        self.__signature__ = sig
        del self.__wrapped__  # let inspect report __signature__ (without self when bound)

    def _start(self, args: tuple, kwargs: dict, aio: bool) -> Any:
        _double.record(self._name, args, kwargs, aio)
        return self._impl(self._bound, *args, **kwargs) if self._bound is not None else self._impl(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _double.loop.run(self._start(args, kwargs, False))

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        return _double.loop.aio(self._start(args, kwargs, True))


class GeneratorWithAio(FunctionWithAio):
    """The same for an async generator (Sandbox.list): a plain iterator, or `.aio` as an
    async iterator. The double collects the items on its loop and hands them over."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return iter(_double.loop.run(_collect(self._start(args, kwargs, False))))

    def aio(self, *args: Any, **kwargs: Any) -> AsyncIterator:
        source = self._start(args, kwargs, True)

        async def items() -> AsyncIterator:
            for item in await _double.loop.aio(_collect(source)):
                yield item
        return items()


async def _collect(source: AsyncIterator) -> list:
    return [item async for item in source]


class aio_static:
    """A static SDK call with `.aio`, recorded as "Class.name"."""
    wrapper = FunctionWithAio

    def __init__(self, impl: Callable) -> None:
        self.impl = impl

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = f"{owner.__name__}.{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> FunctionWithAio:
        return self.wrapper(self.name, self.impl)


class aio_generator(aio_static):
    wrapper = GeneratorWithAio


class aio_method(aio_static):
    """A method with `.aio`. Looked up on the class, its signature shows `self`, as the
    real SDK's does."""

    def __get__(self, obj: Any, owner: type | None = None) -> FunctionWithAio:
        return FunctionWithAio(self.name, self.impl, bound=obj)


def recorded(name: str) -> Callable[[Callable], Callable]:
    """A plain (blocking, no .aio) SDK function, recorded. Methods are recorded without self."""
    def wrap(func: Callable) -> Callable:
        is_method = list(inspect.signature(func).parameters)[:1] in (["self"], ["cls"])

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            _double.record(name, args[1:] if is_method else args, kwargs)
            return func(*args, **kwargs)
        return call
    return wrap


# --- App, Image, Secret, Probe ----------------------------------------------------------------------

class App:
    """An app as `App.lookup` returns it: a name and a stable id (per name and state dir)."""

    def __init__(self, name: str | None = None, *, app_id: str | None = None) -> None:
        self._name, self._app_id = name, app_id

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def app_id(self) -> str | None:
        return self._app_id

    def __repr__(self) -> str:
        return f"App({self._name!r}, app_id={self._app_id!r})"

    @aio_static
    async def lookup(name: str, *, client: Any = None, environment_name: str | None = None,
                     create_if_missing: bool = False) -> App:
        _double.take_fault("App.lookup")
        return App(name, app_id=_double.app_id_for(name, create_if_missing))


class Image:
    """A lazy image: records its recipe and builds nothing (the sandbox runs on this
    machine's Python and packages). What matters locally is kept: `.env()` variables, and
    `add_local_python_source` modules, whose folders go first on the sandbox's PYTHONPATH."""

    def __init__(self, recipe: tuple = ()) -> None:
        self.recipe = recipe

    def _then(self, step: str, *args: Any, **kwargs: Any) -> Image:
        return Image((*self.recipe, (step, args, kwargs)))

    def __repr__(self) -> str:
        return f"Image({[step for step, _, _ in self.recipe]})"

    @staticmethod
    @recorded("Image.from_registry")
    def from_registry(tag: str, secret: Secret | None = None, *, setup_dockerfile_commands: list[str] = [],
                      force_build: bool = False, add_python: str | None = None, **kwargs: Any) -> Image:
        return Image()._then("from_registry", tag, add_python=add_python)

    @recorded("Image.pip_install")
    def pip_install(self, *packages: str | list[str], find_links: str | None = None, index_url: str | None = None,
                    extra_index_url: str | None = None, pre: bool = False, extra_options: str = "",
                    force_build: bool = False, env: dict[str, str | None] | None = None,
                    secrets: Collection[Secret] | None = None, gpu: str | None = None) -> Image:
        return self._then("pip_install", *packages)

    @recorded("Image.add_local_python_source")
    def add_local_python_source(self, *modules: str, copy: bool = False, ignore: Any = _NON_PYTHON_FILES) -> Image:
        return self._then("add_local_python_source", *modules)

    @recorded("Image.env")
    def env(self, vars: dict[str, str]) -> Image:  # noqa: A002 - the real SDK's parameter name
        return self._then("env", dict(vars))

    def environment(self) -> dict[str, str]:
        """The variables this image sets in a sandbox."""
        result: dict[str, str] = {}
        sources: list[str] = []
        for step, args, _ in self.recipe:
            if step == "env":
                result.update(args[0])
            elif step == "add_local_python_source":
                sources += [_source_root(module) for module in args]
        if sources:
            result["PYTHONPATH"] = os.pathsep.join([*sources, *filter(None, [os.environ.get("PYTHONPATH")])])
        return result


def _source_root(module: str) -> str:
    """The folder to put on PYTHONPATH so that `module` imports as it does here."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise exception.InvalidError(f"add_local_python_source: module {module!r} not found locally")
    path = Path(spec.origin).resolve().parent
    return str(path.parent if spec.submodule_search_locations else path)


class Secret:
    """Environment variables a sandbox gets (that is how Modal delivers secrets)."""

    def __init__(self, values: dict[str, str] | None = None, name: str | None = None,
                 required_keys: Sequence[str] = ()) -> None:
        self._values, self._name, self._required = values, name, list(required_keys)

    def __repr__(self) -> str:  # never the values
        return f"Secret.from_name({self._name!r})" if self._name else f"Secret.from_dict([{', '.join(self._values or {})}])"

    @staticmethod
    @recorded("Secret.from_dict")
    def from_dict(env_dict: dict[str, str | None] = {}) -> Secret:
        values = {k: v for k, v in env_dict.items() if v is not None}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
            raise exception.InvalidError("Secret.from_dict expects a dict of str to str")
        return Secret(values)

    @staticmethod
    @recorded("Secret.from_name")
    def from_name(name: str, *, environment_name: str | None = None, required_keys: list[str] = [],
                  client: Any = None) -> Secret:
        return Secret(name=name, required_keys=required_keys)

    def resolve(self) -> dict[str, str]:
        """The values, as the sandbox gets them: a named secret's from `named_secret()`."""
        if self._name is None:
            return dict(self._values or {})
        values = _double.controls().get("secrets", {}).get(self._name, {})
        missing = [k for k in self._required if k not in values]
        if missing:
            raise exception.NotFoundError(f"Secret {self._name!r} is missing keys {missing}")
        return dict(values)


@dataclass(frozen=True)
class Probe:
    """A readiness probe; the double knows TCP probes."""
    tcp_port: int | None = None
    exec_argv: tuple[str, ...] | None = None
    interval_ms: int = 100

    @classmethod
    @recorded("Probe.with_tcp")
    def with_tcp(cls, port: int, *, interval_ms: int = 100) -> Probe:
        if not isinstance(port, int) or not 0 < port <= 65535:
            raise exception.InvalidError(f"Probe.with_tcp() expects `port` in [1, 65535], got {port!r}")
        if not isinstance(interval_ms, int) or interval_ms <= 0:
            raise exception.InvalidError(f"Probe.with_tcp() expects `interval_ms` > 0, got {interval_ms!r}")
        return cls(tcp_port=port, interval_ms=interval_ms)


# --- Sandbox --------------------------------------------------------------------------------------

def _check_tags(tags: Any) -> dict[str, str]:
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise exception.InvalidError(f"tags must be a dict of str to str, got {tags!r}")
    return dict(tags)


class Sandbox:
    """A handle on one sandbox (a local process group; see _supervisor.py), by id."""

    def __init__(self, rec: dict) -> None:
        self._rec = rec

    @property
    def object_id(self) -> str:
        return self._rec["id"]

    @property
    def returncode(self) -> int | None:
        return _double.returncode(self._rec)

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id})"

    @aio_static
    async def create(
        *args: str,
        app: App | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        image: Image | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Collection[Secret] | None = None,
        network_file_systems: dict = {},
        timeout: int | None = 300,
        idle_timeout: int | None = None,
        workdir: str | None = None,
        gpu: str | None = None,
        cloud: str | None = None,
        region: str | Sequence[str] | None = None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | tuple[int, int] | None = None,
        runtime: str | None = None,
        block_network: bool = False,
        outbound_cidr_allowlist: Sequence[str] | None = None,
        outbound_domain_allowlist: Sequence[str] | None = None,
        _experimental_outbound_policy: Any = None,
        inbound_cidr_allowlist: Sequence[str] | None = None,
        volumes: dict = {},
        pty: bool = False,
        encrypted_ports: Sequence[int] = [],
        h2_ports: Sequence[int] = [],
        unencrypted_ports: Sequence[int] = [],
        custom_domain: str | None = None,
        proxy: Any = None,
        include_oidc_identity_token: bool = False,
        readiness_probe: Probe | None = None,
        verbose: bool = False,
        experimental_options: dict[str, Any] | None = None,
        _experimental_enable_snapshot: bool = False,
        _experimental_persistent: bool = False,
        client: Any = None,
        environment_name: str | None = None,
        pty_info: Any = None,
        cidr_allowlist: Sequence[str] | None = None,
    ) -> Sandbox:
        """Start `args` as a local process group. Of the resources, gpu/cpu/memory/region/
        cloud are recorded only; idle_timeout is recorded, not enforced; timeout is."""
        if app is None:
            raise exception.InvalidError("Sandbox.create needs an `app` (App.lookup(...)) outside a Modal container")
        if not args or not all(isinstance(a, str) for a in args):
            raise exception.InvalidError("All entrypoint arguments must be strings")
        if not isinstance(timeout, int) or timeout <= 0:
            raise exception.InvalidError(f"timeout must be a positive int (seconds), got {timeout!r}")
        if workdir is not None and not workdir.startswith("/"):
            raise exception.InvalidError(f"workdir must be an absolute path, got: {workdir}")
        if image is not None and not isinstance(image, Image):
            raise TypeError(f"Sandbox.create(image=...) expects an Image object, got {image!r}")
        tags = _check_tags(tags or {})
        _double.take_fault("Sandbox.create")
        delay = _double.controls().get("create_delay", 0)
        if delay:
            await asyncio.sleep(delay)
        if not all(isinstance(secret, Secret) for secret in secrets or ()):
            raise exception.InvalidError(f"secrets must be Secret objects, got {secrets!r}")
        extra_env = dict(image.environment()) if image is not None else {}
        for secret in secrets or ():
            extra_env.update(secret.resolve())
        extra_env.update(env or {})
        rec = _double.spawn(
            argv=list(args), app=app, name=name, tags=tags, env=extra_env, encrypted_ports=list(encrypted_ports),
            probe=readiness_probe, timeout=timeout, workdir=workdir,
            details={"idle_timeout": idle_timeout, "gpu": gpu, "cpu": cpu, "memory": memory, "region": region,
                     "cloud": cloud, "image": repr(image), "secrets": [repr(s) for s in secrets or ()],
                     "h2_ports": list(h2_ports), "unencrypted_ports": list(unencrypted_ports), "verbose": verbose})
        return Sandbox(rec)

    @aio_static
    async def from_name(app_name: str, name: str, *, environment_name: str | None = None,
                        include_terminated: bool = False, client: Any = None) -> Sandbox:
        _double.take_fault("Sandbox.from_name")
        for rec in _double.all_records():
            if rec["app_name"] == app_name and rec["name"] == name:
                if include_terminated or _double.returncode(rec) is None:
                    return Sandbox(rec)
        raise exception.NotFoundError(f"Sandbox with name {name!r} not found in app {app_name!r}")

    @aio_static
    async def from_id(sandbox_id: str, client: Any = None) -> Sandbox:
        _double.take_fault("Sandbox.from_id")
        rec = _double.load_record(sandbox_id)
        if rec is None:
            raise exception.NotFoundError(f"Sandbox {sandbox_id} not found")
        return Sandbox(rec)

    @aio_generator
    async def list(*, app_id: str | None = None, tags: dict[str, str] | None = None,
                   client: Any = None) -> AsyncIterator[Sandbox]:
        """Running sandboxes, newest first, whose tags include all of `tags`."""
        _double.take_fault("Sandbox.list")
        if app_id is None:
            warnings.warn("Listing Sandboxes without an `app_id` is deprecated", exception.DeprecationError,
                          stacklevel=2)
        wanted = _check_tags(tags or {}).items()
        for rec in _double.all_records():
            if app_id in (None, rec["app_id"]) and wanted <= rec["tags"].items() and _double.returncode(rec) is None:
                yield Sandbox(rec)

    @aio_method
    async def wait_until_ready(self, *, timeout: int = 300) -> None:
        """Until the readiness probe's port (as remapped) accepts TCP; modal.exception.TimeoutError
        past `timeout`; ConflictError if the sandbox finished first (as the real SDK raises)."""
        _double.take_fault("Sandbox.wait_until_ready")
        if timeout <= 0:
            raise exception.InvalidError(f"`timeout` must be positive, got: {timeout}")
        port = self._rec.get("probe_port")
        if port is None:
            raise exception.InvalidError("Sandbox has no readiness_probe to wait for")
        deadline = time.monotonic() + timeout
        while True:
            if _double.returncode(self._rec) is not None:
                raise exception.ConflictError("Sandbox already finished")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                writer.close()
                return
            except (OSError, asyncio.TimeoutError):
                pass
            if time.monotonic() >= deadline:
                raise exception.TimeoutError("Timeout expired")
            await asyncio.sleep(self._rec["probe_interval_ms"] / 1000)

    @aio_method
    async def tunnels(self, timeout: int = 50) -> dict[int, Tunnel]:
        _double.take_fault("Sandbox.tunnels")
        return {int(port): Tunnel("127.0.0.1", proxy, "", 0) for port, proxy in self._rec["tunnels"].items()}

    @aio_method
    async def poll(self) -> int | None:
        _double.take_fault("Sandbox.poll")
        return _double.returncode(self._rec)

    @aio_method
    async def wait(self, raise_on_termination: bool = True) -> None:
        _double.take_fault("Sandbox.wait")
        while (code := _double.returncode(self._rec)) is None:
            await asyncio.sleep(0.05)
        if code == 124:
            raise exception.SandboxTimeoutError()
        if code == _double.TERMINATED and raise_on_termination:
            raise exception.SandboxTerminatedError()

    @aio_method
    async def terminate(self, *, wait: bool = False) -> int | None:
        """Idempotent; returns once the process group is gone (SIGKILL after ~2 s)."""
        _double.take_fault("Sandbox.terminate")
        await _double.terminate(self._rec)
        return _double.returncode(self._rec) if wait else None

    @aio_method
    async def get_tags(self) -> dict[str, str]:
        _double.take_fault("Sandbox.get_tags")
        self._rec = _double.load_record(self.object_id) or self._rec
        return dict(self._rec["tags"])

    @aio_method
    async def set_tags(self, tags: dict[str, str], *, client: Any = None) -> None:
        _double.take_fault("Sandbox.set_tags")
        tags = _check_tags(tags)
        self._rec = _double.update_record(self.object_id, lambda rec: rec.__setitem__("tags", tags))
