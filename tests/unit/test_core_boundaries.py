import subprocess
import sys

from qops.targets import get_target, list_targets


def test_import_qops_does_not_import_airflow():
    code = (
        "import sys, qops, qops.pipeline, qops.cli, qops.calibration, qops.quantize, qops.evaluate, qops.gates, "
        "qops.cards, qops.registry, qops.spec, qops.examples.german_credit\n"
        "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_target_registry_lists_cpu_targets_with_queues():
    targets = list_targets()
    assert {"x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"} <= set(targets)
    assert targets["x86_64_vnni_int8"].mode == "auto" and targets["x86_64_vnni_int8"].per_channel
    assert targets["x86_64_int8_dynamic"].mode == "dynamic"
    assert targets["arm64_int8"].symmetric_activations and targets["arm64_int8"].activation_type == "int8"
    assert all(r.queue in ("cpu", "gpu") for r in targets.values())


def test_user_registered_target(monkeypatch):
    from qops import targets as t

    @t.register_target("my_board_int8")
    def _mine():
        return t.Recipe(target="my_board_int8", description="test board", placement=t.Placement(hardware="x"),
                        config=t.OrtConfig(mode="dynamic"))

    try:
        assert get_target("my_board_int8").hardware == "x"
    finally:
        t.unregister_target("my_board_int8")


def test_invalid_recipe_is_rejected_with_fix():
    import pytest

    from qops.errors import TargetError
    from qops.targets import OrtConfig, Placement, Recipe

    with pytest.raises(TargetError, match="activation_type='uint8'"):
        Recipe(target="bad", description="", placement=Placement(hardware=""),
               config=OrtConfig(mode="dynamic", activation_type="int8"))
