"""`tunesmith doctor` without a config: the environment, each finding with a severity and what to do."""

from __future__ import annotations

from tunesmith.planning.doctor import PACKAGES, Package, check_environment, check_package, report

PKG = Package("somepkg", minimum="1.2", tested="1.5.3", needed_for="a feature")


def test_package_versions_against_the_minimum_and_the_tested_one():
    assert check_package(PKG, lambda _: "1.5.0").severity == "ok"
    assert check_package(PKG, lambda _: "1.5.9").severity == "ok"  # same minor as tested
    old = check_package(PKG, lambda _: "1.1.9")
    assert old.severity == "error" and "older than the minimum 1.2" in old.message and ">=1.2" in old.suggestion
    new = check_package(PKG, lambda _: "2.0.0")
    assert new.severity == "warning" and "somepkg==1.5.3" in new.suggestion
    missing = check_package(PKG, lambda _: None)
    assert missing.severity == "error" and "a feature" in missing.message
    optional = check_package(Package("opt", "0.1", "0.2", "QLoRA", required=False), lambda _: None)
    assert optional.severity == "info" and "QLoRA" in optional.message


def test_this_environment_is_ready_and_a_broken_one_is_not():
    findings = check_environment()
    assert not [f for f in findings if f.severity == "error"], report(findings)
    topics = {f.topic for f in findings}
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "cpu", "gpu", "disk"} <= topics
    assert "ready to train" in report(findings)

    broken = check_environment(lambda name: None if name == "peft" else "99.0" if name == "torch" else "0.0.1")
    assert "error(s) to fix before training" in report(broken)
    peft = next(f for f in broken if f.topic == "peft")
    assert peft.severity == "error" and "LoRA" in peft.message
    assert next(f for f in broken if f.topic == "torch").severity == "warning"
    assert {p.name for p in PACKAGES} <= {f.topic for f in broken}


def test_doctor_command_prints_the_report():
    from test_config_and_cli import run_cli

    done = run_cli("doctor")
    assert done.returncode == 0, done.stderr
    assert "ok      torch:" in done.stdout and "ready to train" in done.stdout
