from conftest import invoke


def test_version(runner):
    from onnxshrink import __version__

    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout
