"""Fast checks of what a deployment is made of: keys, kits, site and server configs, the app pin."""

from __future__ import annotations

import ipaddress
import json
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune import __version__
from fedtune.config import ConfigError, from_dict
from fedtune.deploy.executor import AppPin
from fedtune.deploy.federation import add_sites, init_federation, load_federation, write_demo_data
from fedtune.deploy.operator import load_server_config, write_app, write_run_config
from fedtune.deploy.site_config import apply_site, load_site_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fed_dir(tmp_path: Path) -> Path:
    init_federation(tmp_path / "fed", ["hosp-a", "hosp-b", "hosp-c"], port=19555, tls_hosts=["fl.example.org", "10.0.0.7"])
    return tmp_path / "fed"


def test_init_federation_writes_ca_superlink_cert_and_site_kits(fed_dir: Path) -> None:
    paths, fed = load_federation(fed_dir)
    assert [s.site_id for s in fed.sites] == ["hosp-a", "hosp-b", "hosp-c"]
    # Every private key is owner-only.
    for key in (paths.ca_key, paths.superlink_key, paths.kit("hosp-a") / "auth.key", paths.kit("hosp-b") / "auth.key"):
        assert _mode(key) == 0o600, key
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.superlink_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) >= {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) >= {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.7")}
    # Site keys in the formats Flower's SuperNode and `flwr supernode register` read.
    private = load_ssh_private_key((paths.kit("hosp-a") / "auth.key").read_bytes(), None)
    public = load_ssh_public_key((paths.kit("hosp-a") / "auth.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (paths.kit("hosp-a") / "ca.crt").read_bytes() == paths.ca_cert.read_bytes()
    # Different sites, different keys; fingerprints recorded for the operator.
    assert fed.sites[0].public_key != fed.sites[1].public_key
    assert all(s.fingerprint.startswith("SHA256:") for s in fed.sites)


def test_init_federation_refuses_bad_input_and_never_overwrites(tmp_path: Path, fed_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--sites"):
        init_federation(tmp_path / "x", [])
    with pytest.raises(ConfigError, match="not a valid site id"):
        init_federation(tmp_path / "y", ["hosp a"])
    with pytest.raises(ConfigError, match="appears twice"):
        init_federation(tmp_path / "z", ["a", "a"])
    before = (fed_dir / "operator" / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a federation"):
        init_federation(fed_dir, ["hosp-d"])
    assert (fed_dir / "operator" / "ca.key").read_bytes() == before
    with pytest.raises(ConfigError, match="already enrolled"):
        add_sites(fed_dir, ["hosp-a"])
    add_sites(fed_dir, ["hosp-d"])
    _, fed = load_federation(fed_dir)
    assert [s.site_id for s in fed.sites] == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]


def test_site_yaml_template_loads_and_every_bad_value_names_its_field(fed_dir: Path) -> None:
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    site_yaml = paths.kit("hosp-a") / "site.yaml"
    site = load_site_config(site_yaml)
    assert site.site_id == "hosp-a" and site.superlink == "127.0.0.1:19555"
    assert site.resolve(site.data.path) == paths.kit("hosp-a") / "data.jsonl"
    for override, field_name in [("budget.epsilon=-1", "budget.epsilon"), ("budget.delta=2", "budget.delta"),
                                 ("superlink=nowhere", "superlink"), ("data.path=missing.jsonl", "data.path"),
                                 ("site_id=a/b", "site_id"), ("runtime_port=80", "runtime_port"),
                                 ("device=tpu", "device"), ("budget.accountant=gdp", "budget.accountant"),
                                 ("auth_private_key=nope.key", "auth_private_key")]:
        with pytest.raises(ConfigError) as err:
            load_site_config(site_yaml, [override])
        assert err.value.field == field_name, override
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device") as err:
            load_site_config(site_yaml, ["device=cuda"])
        assert err.value.field == "device"
    with pytest.raises(ConfigError, match="budget.epsilonn|epsilonn"):
        load_site_config(site_yaml, ["budget.epsilonn=3"])
    with pytest.raises(ConfigError, match="--site-config"):
        load_site_config(paths.kit("hosp-a") / "nope.yaml")


def test_a_site_trains_on_its_own_data_and_budget_whatever_the_server_sends(fed_dir: Path) -> None:
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    site = load_site_config(paths.kit("hosp-b") / "site.yaml", ["budget.epsilon=2.5", "budget.delta=1e-6"])
    server_cfg = from_dict({"privacy": {"target_epsilon": 50.0, "delta": 0.1, "enabled": False},
                            "data": {"path": "/server/has/no/such/file.jsonl"}})
    local = apply_site(server_cfg, site)
    assert local.privacy.target_epsilon == 2.5 and local.privacy.delta == 1e-6 and local.privacy.enabled
    assert local.data.path == str(paths.kit("hosp-b") / "data.jsonl")
    assert server_cfg.privacy.target_epsilon == 50.0  # the run's config is not modified


def test_server_config_is_validated_before_anything_starts(fed_dir: Path) -> None:
    paths, fed = load_federation(fed_dir)
    cfg = load_server_config(paths, fed, None, ["federation.num_sites=3", "federation.num_rounds=3"])
    assert cfg.run_dir == str(paths.run_dir)
    assert cfg.federation.round_timeout_s == 600.0  # real sites can vanish
    with pytest.raises(ConfigError) as err:
        load_server_config(paths, fed, None, ["federation.num_sites=4"])
    assert err.value.field == "federation.num_sites"
    with pytest.raises(ConfigError) as err:
        load_server_config(paths, fed, None, ["federation.num_sites=3", "train.seed=0"])
    assert err.value.field == "train.seed"
    with pytest.raises(ConfigError) as err:
        load_server_config(paths, fed, None, ["federation.num_sites=3", "privacy.delta=3"])
    assert err.value.field == "privacy.delta"


def test_run_config_and_app_round_trip_for_flwr_run(fed_dir: Path) -> None:
    paths, fed = load_federation(fed_dir)
    cfg = load_server_config(paths, fed, None, ["federation.num_sites=3", "federation.num_rounds=4"])
    run_config = tomllib.loads(write_run_config(paths, cfg, {12345678901234567890: "hosp-a"}).read_text())
    assert from_dict(json.loads(run_config["fedtune-config"])) == cfg
    assert json.loads(run_config["fedtune-sites"]) == {"12345678901234567890": "hosp-a"}
    app = write_app(paths)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
    assert project["tool"]["flwr"]["app"]["publisher"] == "fedtune"
    assert set(project["tool"]["flwr"]["app"]["config"]) == {"fedtune-config", "fedtune-sites"}
    assert (app / "client" / "app.py").is_file() and (app / "server" / "app.py").is_file()


def test_app_pin_refuses_any_other_app_or_version() -> None:
    from flwr.supercore.run import Run

    pin = AppPin("fedtune", "fedtune", "0.1.0")

    def run(fab_id: str, version: str) -> Run:
        return Run(
            run_id=7, fab_id=fab_id, fab_version=version, fab_hash="h", override_config={}, pending_at="",
            starting_at="", running_at="", finished_at="", status=None, flwr_aid="", federation_id="",  # type: ignore[arg-type]
            primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0)

    assert pin.refusal(run("fedtune/fedtune", "0.1.0")) is None
    reason = pin.refusal(run("fedtune/fedtune", "0.2.0"))
    assert reason is not None and "0.2.0" in reason and "0.1.0" in reason
    assert pin.refusal(run("evil/fedtune", "0.1.0")) is not None
    assert pin.refusal(run("", "")) is not None
