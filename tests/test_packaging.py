"""The template sets and the registry must ship inside the wheel, not only in the checkout."""

import subprocess
import sys
import zipfile


def test_wheel_carries_the_data_and_finds_it(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        capture_output=True,
        text=True,
        cwd=str(__import__("conftest").REPO),
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("metaeol_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in (
        "metaeol_edge/prompt_sets/metaeol.json",
        "metaeol_edge/prompt_sets/prompteol.json",
        "metaeol_edge/model_registry/registry.json",
        "metaeol_edge/preset_data/presets.json",
        "metaeol_edge/preset_data/smollm2-135m.quality-2.npz",
        "metaeol_edge/preset_data/smollm2-135m.quality-1.npz",  # revision 1, for what was made with it
        "metaeol_edge/faces/web/static/index.html",  # the page of `metaeol serve`
        "metaeol_edge/faces/web/static/app.js",
    ):
        assert data in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import metaeol_edge, metaeol_edge.prompts as p, metaeol_edge.registry as r, metaeol_edge.presets as s;"
        f"assert metaeol_edge.__file__.startswith({str(site)!r}), metaeol_edge.__file__;"
        "q = s.get_preset('quality@2'); f = q.fits['smollm2-135m']; g = s.get_preset('quality').fits['gemma3-270m'];"
        "print('metaeol' in p.builtin_names() and 'prompteol' in p.builtin_names(), len(p.load_templates('metaeol')),"
        " r.default_model_id(), q.shipped_fit(f.sha256) is not None,"
        " s.get_preset('quality').shipped_fit(g.sha256) is not None,"
        " s.get_preset('quality@1').shipped_fit(f.sha256) is not None)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True 8 smollm2-135m True True True"
