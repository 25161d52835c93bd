from conftest import invoke


def test_version(runner):
    from onnxshrink import __version__

    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_public_functions_are_not_shadowed_by_submodules():
    """`import onnxshrink.X` sets the package attribute X to the module: no module may share a public function's name."""
    import importlib
    import pkgutil

    import onnxshrink

    for module in pkgutil.walk_packages(onnxshrink.__path__, "onnxshrink."):
        importlib.import_module(module.name)
    for name in onnxshrink.__all__:
        if name != "__version__":
            assert callable(getattr(onnxshrink, name)) and not isinstance(getattr(onnxshrink, name), type(onnxshrink)), name


def test_readme_is_short_and_its_links_resolve():
    """The README is the quick start (issue 17: under ~250 lines); the reference lives in docs/, and every relative
    link from either lands on a file that exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.index("## Quick start on your own model") < readme.index("make demo")  # the user's model first
    assert "Figures depend on the machine" in readme
    for page in (root / "README.md", root / "docs" / "commands.md", root / "docs" / "python-api.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
