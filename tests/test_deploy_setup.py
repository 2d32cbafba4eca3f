"""Fast checks of what a deployment is made of: keys, kits, site and server configs, the app pin."""

from __future__ import annotations

import ipaddress
import json
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune import __version__
from fedtune.config import from_dict, to_dict
from fedtune.errors import ConfigError
from fedtune.deploy import pki
from fedtune.deploy.executor import AppPin
from fedtune.deploy.federation import FederationPaths, add_sites, init_federation, load_federation, write_demo_data
from fedtune.deploy.operator import load_server_config, write_app, write_run_config
from fedtune.deploy.run_config import site_run_config
from fedtune.deploy.site_config import load_site_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _site_key(home: Path) -> bytes:
    """What a site does first: make its own key pair in its own folder; returns the auth.pub it sends."""
    _, public, _ = pki.write_site_keypair(home)
    return public.read_bytes()


def _install_kit(paths: FederationPaths, site_id: str, home: Path) -> Path:
    """What a site does with the kit it receives: put its files beside its own auth.key; returns site.yaml."""
    for item in paths.kit(site_id).iterdir():
        shutil.copy(item, home / item.name)
    return home / "site.yaml"


@pytest.fixture
def fed_dir(tmp_path: Path) -> Path:
    keys = {site: _site_key(tmp_path / "homes" / site) for site in ("hosp-a", "hosp-b", "hosp-c")}
    init_federation(tmp_path / "fed", keys, port=19555, tls_hosts=["fl.example.org", "10.0.0.7"])
    return tmp_path / "fed"


def test_init_federation_writes_ca_superlink_cert_and_site_kits(fed_dir: Path, tmp_path: Path) -> None:
    paths, fed = load_federation(fed_dir)
    assert [s.site_id for s in fed.sites] == ["hosp-a", "hosp-b", "hosp-c"]
    # Every private key is owner-only, and no kit holds one: a kit is the CA certificate and site.yaml.
    for key in (paths.ca_key, paths.superlink_key, tmp_path / "homes" / "hosp-a" / "auth.key"):
        assert _mode(key) == 0o600, key
    for site in fed.sites:
        assert sorted(p.name for p in paths.kit(site.site_id).iterdir()) == ["ca.crt", "roster.json", "site.yaml"]
        assert not site.operator_holds_key
        enrolled = paths.site_public_key(site.site_id).read_bytes()
        assert enrolled.strip() == (tmp_path / "homes" / site.site_id / "auth.pub").read_bytes().strip()
        assert site.fingerprint == pki.public_key_fingerprint(enrolled)
    assert "auth_private_key: auth.key" in (paths.kit("hosp-a") / "site.yaml").read_text()
    assert "fedtune client keygen" in (paths.kit("hosp-a") / "site.yaml").read_text()
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.superlink_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) >= {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) >= {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.7")}
    # Site keys in the formats Flower's SuperNode and `flwr supernode register` read.
    private = load_ssh_private_key((tmp_path / "homes" / "hosp-a" / "auth.key").read_bytes(), None)
    public = load_ssh_public_key(paths.site_public_key("hosp-a").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (paths.kit("hosp-a") / "ca.crt").read_bytes() == paths.ca_cert.read_bytes()
    # Different sites, different keys; fingerprints recorded for the operator.
    assert fed.sites[0].public_key != fed.sites[1].public_key
    assert all(s.fingerprint.startswith("SHA256:") for s in fed.sites)


def test_init_federation_refuses_bad_input_and_never_overwrites(tmp_path: Path, fed_dir: Path) -> None:
    key = _site_key(tmp_path / "homes" / "new")
    with pytest.raises(ConfigError, match="no site named") as err:
        init_federation(tmp_path / "x", {})
    assert err.value.field == "--site" and "fedtune client keygen" in str(err.value)
    with pytest.raises(ConfigError, match="not a valid site id"):
        init_federation(tmp_path / "y", {"hosp a": key})
    with pytest.raises(ConfigError, match="appears twice"):
        init_federation(tmp_path / "z", {"a": key}, demo_sites=["a"])
    private = (tmp_path / "homes" / "new" / "auth.key").read_bytes()
    for bad, words in ((private, "PRIVATE key"), (b"ssh-ed25519 AAAA", "OpenSSH public key"),
                       (b"not a key", "OpenSSH public key")):
        with pytest.raises(ConfigError, match=words) as err:
            init_federation(tmp_path / "w", {"a": bad})
        assert err.value.field == "--site"
    with pytest.raises(ConfigError, match="same public key"):
        init_federation(tmp_path / "v", {"a": key, "b": key})
    assert not (tmp_path / "w").exists() and not (tmp_path / "v").exists()  # nothing written on a refusal
    before = (fed_dir / "operator" / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a federation"):
        init_federation(fed_dir, {"hosp-d": key})
    assert (fed_dir / "operator" / "ca.key").read_bytes() == before
    with pytest.raises(ConfigError, match="already enrolled"):
        add_sites(fed_dir, {"hosp-a": key})
    with pytest.raises(ConfigError, match="same public key"):
        add_sites(fed_dir, {"hosp-d": (tmp_path / "homes" / "hosp-b" / "auth.pub").read_bytes()})
    add_sites(fed_dir, {"hosp-d": key})
    paths, fed = load_federation(fed_dir)
    assert [s.site_id for s in fed.sites] == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
    assert sorted(p.name for p in paths.kit("hosp-d").iterdir()) == ["ca.crt", "roster.json", "site.yaml"]
    assert "runtime_port: 9103" in (paths.kit("hosp-d") / "site.yaml").read_text()
    _check_rosters(paths, tmp_path / "homes")


def _check_rosters(paths: FederationPaths, homes: Path) -> None:
    """Every kit holds the same CA-signed roster of all enrolled keys; a changed or foreign one is refused."""
    from fedtune.deploy.roster import load_roster, signed_roster, site_identity

    text = (paths.kit("hosp-a") / "roster.json").read_text()
    assert all((paths.kit(s) / "roster.json").read_text() == text for s in ("hosp-b", "hosp-c", "hosp-d"))
    roster = load_roster(paths.kit("hosp-a") / "roster.json", paths.ca_cert)
    assert sorted(roster.sites) == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"] and roster.version == 4
    identity = site_identity(paths.kit("hosp-a") / "roster.json", paths.ca_cert, "hosp-a", homes / "hosp-a" / "auth.key")
    assert identity.verify("hosp-a", b"x", identity.sign(b"x")) and not identity.verify("hosp-b", b"x", identity.sign(b"x"))
    with pytest.raises(ConfigError, match="does not list hosp-b under this site's auth key"):
        site_identity(paths.kit("hosp-b") / "roster.json", paths.ca_cert, "hosp-b", homes / "hosp-a" / "auth.key")
    document = json.loads(text)
    swapped = dict(document["roster"]["sites"], **{"hosp-b": document["roster"]["sites"]["hosp-a"]})
    tampered = paths.root / "tampered.json"
    tampered.write_text(json.dumps({**document, "roster": {**document["roster"], "sites": swapped}}))
    with pytest.raises(ConfigError, match="not the federation CA's"):
        load_roster(tampered, paths.ca_cert)
    foreign = pki.CertificateAuthority.create("other")  # the server's own CA: not the one in the kit
    tampered.write_text(signed_roster(roster.federation, 5, document["roster"]["sites"], foreign.key))
    with pytest.raises(ConfigError, match="not the federation CA's"):
        load_roster(tampered, paths.ca_cert)


def test_demo_keys_are_generated_into_the_kits_with_a_warning(tmp_path: Path, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="fedtune"):
        init_federation(tmp_path / "fed", demo_sites=["a", "b", "c"])
    assert "--demo-keys" in caplog.text and "can act as these sites" in caplog.text
    paths, fed = load_federation(tmp_path / "fed")
    write_demo_data(paths, fed, demo_records=200)
    for site in fed.sites:
        kit = paths.kit(site.site_id)
        assert site.operator_holds_key and "DEMO KEY" in (kit / "site.yaml").read_text()
        assert _mode(kit / "auth.key") == 0o600
        assert pki.public_key_fingerprint((kit / "auth.pub").read_bytes()) == site.fingerprint
        load_site_config(kit / "site.yaml")  # the kit runs as it is
    assert len({s.public_key for s in fed.sites}) == 3


def test_operator_state_is_owner_only_and_older_state_is_tightened(fed_dir: Path) -> None:
    from fedtune.deploy.federation import secure_server_state
    from fedtune.deploy.operator import SuperLink

    paths, fed = load_federation(fed_dir)
    # State from an older fedtune (or copied in) with looser modes.
    (paths.run_dir / "adapters").mkdir(parents=True)
    (paths.run_dir / "adapters" / "old.safetensors").write_bytes(b"x")
    (paths.superlink_dir / "state.db").write_bytes(b"")
    for path in (paths.run_dir, paths.run_dir / "adapters", paths.superlink_dir, paths.operator_dir):
        path.chmod(0o755)
    for path in (paths.run_dir / "adapters" / "old.safetensors", paths.superlink_dir / "state.db"):
        path.chmod(0o644)
    secure_server_state(paths)
    SuperLink(paths, fed)  # writes flwr-home; starts nothing
    for top in paths.private_dirs:
        for path in [top, *top.rglob("*")]:
            if path.is_dir():
                assert _mode(path) == 0o700, path
            elif path.suffix == ".crt":
                assert _mode(path) == 0o644, path  # certificates may stay readable
            else:
                assert _mode(path) == 0o600, path
    assert (paths.flwr_home / "config.toml").is_file()
    assert _mode(paths.server_config) == 0o600 and _mode(paths.federation_file) == 0o600


def test_flower_processes_create_their_files_owner_only(tmp_path: Path) -> None:
    """The SuperLink creates its database (plain-mode updates) itself: its umask decides the mode."""
    import sys

    from fedtune.deploy import processes

    script = ("import os, sqlite3; sqlite3.connect('state.db').execute('create table t (x)'); "
              "os.makedirs('run/adapters'); open('run/adapters/a.bin', 'w').write('x')")
    process = processes.start([sys.executable, "-c", script], log_path=tmp_path / "child.log", cwd=tmp_path,
                              umask=pki.PRIVATE_UMASK)
    assert process.wait(timeout=60) == 0
    assert _mode(tmp_path / "state.db") == 0o600 and _mode(tmp_path / "child.log") == 0o600
    assert _mode(tmp_path / "run") == 0o700 and _mode(tmp_path / "run" / "adapters" / "a.bin") == 0o600


def test_keygen_and_init_federation_commands(tmp_path: Path, capsys) -> None:
    from fedtune.deploy.cli import client_main, init_federation_main

    client_main(["keygen", "--out", str(tmp_path / "hosp-a")])
    out = capsys.readouterr().out
    home = tmp_path / "hosp-a"
    assert _mode(home / "auth.key") == 0o600 and _mode(home) == 0o700
    assert pki.public_key_fingerprint((home / "auth.pub").read_bytes()) in out and "auth.pub" in out
    before = (home / "auth.key").read_bytes()
    with pytest.raises(SystemExit):
        client_main(["keygen", "--out", str(home)])
    assert "'--out'" in capsys.readouterr().err and (home / "auth.key").read_bytes() == before
    (tmp_path / "keys").mkdir()
    for site in ("hosp-b", "hosp-c"):
        shutil.copy(pki.write_site_keypair(tmp_path / site)[1], tmp_path / "keys" / f"{site}.pub")
    # Naming sites without their public keys is refused, with the secure way as the fix.
    with pytest.raises(SystemExit):
        init_federation_main([str(tmp_path / "fed"), "--sites", "hosp-a,hosp-b"])
    err = capsys.readouterr().err
    assert "'--sites'" in err and "fedtune client keygen" in err and "--demo-keys" in err
    init_federation_main([str(tmp_path / "fed"), "--site", f"hosp-a={home / 'auth.pub'}",
                          "--site-keys", str(tmp_path / "keys")])
    assert "SHA256:" in capsys.readouterr().out
    init_federation_main([str(tmp_path / "fed"), "--add-sites", "demo-d", "--demo-keys"])
    paths, fed = load_federation(tmp_path / "fed")
    assert [(s.site_id, s.operator_holds_key) for s in fed.sites] == [
        ("hosp-a", False), ("hosp-b", False), ("hosp-c", False), ("demo-d", True)]
    assert (paths.kit("demo-d") / "auth.key").is_file() and not (paths.kit("hosp-b") / "auth.key").exists()
    with pytest.raises(SystemExit):
        init_federation_main([str(tmp_path / "fed"), "--add-sites", "--site", f"x={tmp_path / 'nope.pub'}"])
    assert "does not exist" in capsys.readouterr().err


def test_site_yaml_template_loads_and_every_bad_value_names_its_field(fed_dir: Path, tmp_path: Path) -> None:
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    home = tmp_path / "homes" / "hosp-a"
    with pytest.raises(ConfigError) as err:  # the kit alone has no key: the site's own goes beside it
        load_site_config(paths.kit("hosp-a") / "site.yaml")
    assert err.value.field == "auth_private_key"
    site_yaml = _install_kit(paths, "hosp-a", home)
    site = load_site_config(site_yaml)
    assert site.site_id == "hosp-a" and site.superlink == "127.0.0.1:19555"
    assert site.resolve(site.data.path) == home / "data.jsonl"
    assert site.resolve(site.auth_private_key) == home / "auth.key"
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


def test_a_site_trains_on_its_own_data_and_budget_whatever_the_server_sends(fed_dir: Path, tmp_path: Path) -> None:
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    home = tmp_path / "homes" / "hosp-b"
    site = load_site_config(_install_kit(paths, "hosp-b", home), ["budget.epsilon=2.5", "budget.delta=1e-6"])
    server_cfg = from_dict({"privacy": {"target_epsilon": 50.0, "delta": 0.1, "enabled": False},
                            "data": {"path": "/server/has/no/such/file.jsonl"}})
    local = site_run_config(json.dumps(to_dict(server_cfg)), site)
    assert local.privacy.target_epsilon == 2.5 and local.privacy.delta == 1e-6 and local.privacy.enabled
    assert local.data.path == str(home / "data.jsonl")
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
    # The server's ledger is the federation's, beside the enrolment records, in every run.
    assert run_config["fedtune-ledger"] == str(paths.operator_dir / "server_ledger.sqlite")
    app = write_app(paths)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
    assert project["tool"]["flwr"]["app"]["publisher"] == "fedtune"
    keys = {"fedtune-config", "fedtune-sites", "fedtune-ledger"}
    assert set(project["tool"]["flwr"]["app"]["config"]) == keys
    # The repository's own app declares the same keys (flwr drops run-config keys an app does not declare).
    repo = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(repo["tool"]["flwr"]["app"]["config"]) == keys
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


def test_a_site_names_its_own_gguf_copy_and_takes_the_runs_dtype(fed_dir: Path, tmp_path: Path) -> None:
    """The GGUF file and its cache are the site's (site.yaml); the base dtype is shared, like the LoRA shape."""
    pytest.importorskip("gguf")
    from gguf_files import write_tiny_gguf

    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    home = tmp_path / "homes" / "hosp-c"
    site_yaml = _install_kit(paths, "hosp-c", home)
    (home / "base").mkdir()
    write_tiny_gguf(home / "base" / "tiny.gguf")
    site = load_site_config(site_yaml, ["model_path=base", "model_gguf_file=tiny.gguf", "model_cache_dir=cache"])
    server_cfg = from_dict({"model": {"dtype": "bfloat16", "gguf_file": "../../etc/passwd",
                                      "cache_dir": "/server/cache", "path": "/server/model"}})
    local = site_run_config(json.dumps(to_dict(server_cfg)), site)
    assert (local.model.path, local.model.gguf_file) == (str(home / "base"), "tiny.gguf")
    assert local.model.cache_dir == str(home / "cache") and local.model.dtype == "bfloat16"
    for override in ("model_gguf_file=../base/tiny.gguf", "model_gguf_file=absent.gguf"):
        with pytest.raises(ConfigError) as err:
            load_site_config(site_yaml, ["model_path=base", override])
        assert err.value.field == "model_gguf_file", override
    with pytest.raises(ConfigError, match="model_path is null"):
        load_site_config(site_yaml, ["model_gguf_file=tiny.gguf"])


def test_gradient_checkpointing_is_the_sites_own_choice(fed_dir: Path, tmp_path: Path) -> None:
    """A memory/time trade-off of the site's machine: site.yaml decides, the server's run config cannot."""
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    site_yaml = _install_kit(paths, "hosp-c", tmp_path / "homes" / "hosp-c")
    server_cfg = from_dict({"model": {"gradient_checkpointing": True}})
    assert not site_run_config(json.dumps(to_dict(server_cfg)), load_site_config(site_yaml)).model.gradient_checkpointing
    site = load_site_config(site_yaml, ["model_gradient_checkpointing=true"])
    server_cfg.model.gradient_checkpointing = False
    assert site_run_config(json.dumps(to_dict(server_cfg)), site).model.gradient_checkpointing


def test_the_operator_reads_a_run_that_trained_nothing_as_a_failure(tmp_path: Path) -> None:
    """`fedtune server` exits 1 when the run's summary says it trained nothing (operator._failure)."""
    from fedtune.deploy.operator import _failure

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rounds_completed": 3, "failed": None}))
    assert _failure(summary) is None
    summary.write_text(json.dumps({"rounds_completed": 0, "failed": "no site connected"}))
    assert _failure(summary) == "no site connected"
    summary.write_text("{broken")
    assert "not a readable summary" in _failure(summary)


def test_quantisation_is_the_sites_own_choice(fed_dir: Path, tmp_path: Path) -> None:
    """QLoRA is a memory choice of the site's machine: site.yaml decides, the server's run config cannot."""
    paths, fed = load_federation(fed_dir)
    write_demo_data(paths, fed, demo_records=200)
    site_yaml = _install_kit(paths, "hosp-c", tmp_path / "homes" / "hosp-c")
    server_cfg = from_dict({"model": {"quantization": "4bit"}})
    assert site_run_config(json.dumps(to_dict(server_cfg)), load_site_config(site_yaml)).model.quantization is None
    site = load_site_config(site_yaml, ["model_quantization=4bit"])
    server_cfg.model.quantization = None
    assert site_run_config(json.dumps(to_dict(server_cfg)), site).model.quantization == "4bit"
    with pytest.raises(ConfigError, match="model_quantization"):
        load_site_config(site_yaml, ["model_quantization=2bit"])
