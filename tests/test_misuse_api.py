"""Issue 20's misuse campaign, classes 3, 4 and 6: public arguments of the wrong type,
raw errors from entry points other than lighten, and the command line's exit codes.

Every case asserts the LwCompileError subclass and that its message names the problem.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.cli import app as cli_app
from lwcompile.cli import main
from tests.helpers import tiny_factory_in

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, channels, 3, padding=1))


class OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.head(x)))


@pytest.fixture(scope="module")
def light() -> nn.Module:
    return lwcompile.lighten(tiny(), (torch.rand(1, 3, 16, 16),))


X = (torch.rand(1, 3, 16, 16),)

# --- Class 3: argument checking -------------------------------------------------------------

BAD_COMPILE_ARGS = [
    ({"example_inputs": 5}, "example_inputs must be a tensor or a tuple/list"),
    ({"example_inputs": "image.png"}, "example_inputs must be a tensor or a tuple/list"),
    ({"example_inputs": {"x": 1}}, "example_inputs must be a tensor or a tuple/list"),
    ({"example_kwargs": [1, 2]}, "example_kwargs must be a dict"),
    ({"example_kwargs": {1: 2}}, "example_kwargs must have string keys"),
    ({"rules": 5}, "rules must be a list or tuple"),
    ({"rules": "list"}, "rules must be a list or tuple"),
    ({"guards": 5}, "guards must be a list or tuple"),
    ({"guards": "exclude"}, "guards must be a list or tuple"),
    ({"exclude": None}, "exclude must be a string or a list of strings, got None"),
    ({"exclude": 5}, "exclude must be a string or a list of strings, got a int"),
    ({"exclude": [1, "body.*"]}, "exclude must hold strings"),
    ({"exclude": [None]}, "exclude must hold strings"),
    ({"rule_params": 5}, "rule_params must be a dict"),
    ({"rule_params": ["list"]}, "rule_params must be a dict"),
    ({"rule_params": {"list": 8}}, r"rule_params\['list'\] must be a dict"),
    ({"rule_params": {"list": None}}, r"rule_params\['list'\] must be a dict"),
    ({"rule_params": {3: {}}}, "rule_params must have string keys"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_COMPILE_ARGS)
@pytest.mark.parametrize("entry", [lwcompile.lighten, lwcompile.plan])
def test_compile_arguments_of_the_wrong_type(entry, kwargs, message):
    with pytest.raises(lwcompile.ArgumentError, match=message) as caught:
        entry(tiny(), **kwargs)
    assert isinstance(caught.value, (lwcompile.LwCompileError, TypeError))
    assert entry.__name__ in str(caught.value)


@pytest.mark.parametrize("without", [5, None, [1], [None, "list"]])
def test_default_rules_without_of_the_wrong_type(without):
    with pytest.raises(lwcompile.ArgumentError, match="without must"):
        lwcompile.default_rules(without=without)


class ReturnsString(lwcompile.Guard):
    name = "says-no-as-text"

    def check(self, proposal):
        return "no"


class ReturnsBool(lwcompile.Guard):
    name = "says-false"

    def check(self, proposal):
        return False


@pytest.mark.parametrize("guard", [ReturnsString(), ReturnsBool()])
def test_a_guard_returning_neither_veto_nor_none_is_named(guard):
    returned = type(guard.check(None)).__name__
    with pytest.raises(lwcompile.RuleError, match=rf"guard {guard.name!r}.* returned "
                                                  rf"{returned} .*must return Veto or None"):
        lwcompile.lighten(tiny(), X, guards=[guard])


BAD_PATHS = [None, 5, b"", "", ["a.pt"]]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_save_path_of_the_wrong_type(light, path):
    with pytest.raises(lwcompile.ArgumentError, match="save: path must be a file path"):
        lwcompile.save(light, path)


@pytest.mark.parametrize("path", BAD_PATHS)
@pytest.mark.parametrize("entry", [lwcompile.load, lwcompile.info])
def test_load_and_info_path_of_the_wrong_type(entry, path):
    with pytest.raises(lwcompile.ArgumentError, match=f"{entry.__name__}: path must be"):
        entry(path)


def test_save_report_of_the_wrong_type(light, tmp_path):
    with pytest.raises(lwcompile.ArgumentError, match="report must be a Report"):
        lwcompile.save(light, tmp_path / "a.pt", report="nothing")


@pytest.mark.parametrize("map_location", [5, ["cpu"]])
def test_load_map_location_of_the_wrong_type(map_location, tmp_path, light):
    path = lwcompile.save(light, tmp_path / "a.pt")
    with pytest.raises(lwcompile.ArgumentError, match="map_location must be"):
        lwcompile.load(path, map_location=map_location)


@pytest.mark.parametrize("entry", [lwcompile.emit_fast, lwcompile.export_program,
                                   lwcompile.profile])
@pytest.mark.parametrize(("model", "inputs", "message"), [
    ("model.pt", X, "model must be an nn.Module"),
    (None, X, "model must be an nn.Module"),
    ("tiny", None, "example_inputs must be a tensor"),
    ("tiny", 5, "example_inputs must be a tensor"),
])
def test_deployment_and_profile_arguments(entry, model, inputs, message):
    model = tiny() if model == "tiny" else model
    error = lwcompile.NotAModuleError if "Module" in message else lwcompile.ArgumentError
    with pytest.raises(error, match=message):
        entry(model, inputs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "m"}, "model must be an nn.Module"),
    ({"example_inputs": None}, "example_inputs must be a tensor"),
    ({"path": None}, "path must be a file path"),
    ({"path": 3}, "path must be a file path"),
])
@pytest.mark.parametrize("entry", [lwcompile.export_onnx, lwcompile.export_mobile])
def test_export_arguments(entry, kwargs, message, tmp_path):
    call = {"model": tiny(), "example_inputs": X, "path": tmp_path / "m.onnx", **kwargs}
    with pytest.raises(lwcompile.LwCompileError, match=message):
        entry(call["model"], call["example_inputs"], call["path"])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runs": 0}, "runs must be >= 1"), ({"runs": "7"}, "runs must be an int"),
    ({"warmup": -1}, "warmup must be >= 0"),
])
def test_profile_counts(kwargs, message):
    with pytest.raises(lwcompile.ArgumentError, match=message):
        lwcompile.profile(tiny(), X, **kwargs)


@pytest.mark.parametrize("thing", [None, "model", 3])
@pytest.mark.parametrize("entry", [lwcompile.count_params, lwcompile.count_macs])
def test_counting_needs_a_module(entry, thing):
    with pytest.raises(lwcompile.NotAModuleError, match="must be an nn.Module"):
        entry(thing)


@pytest.mark.parametrize(("report", "path", "message"), [
    (None, "r.html", "report_dict must be a dict"),
    ("report", "r.html", "report_dict must be a dict"),
    ({}, None, "path must be a file path"),
])
def test_write_html_arguments(report, path, message, tmp_path):
    path = tmp_path / path if path else path
    with pytest.raises(lwcompile.ArgumentError, match=message):
        lwcompile.write_html(report, path)


TRAIN_BAD = [
    ({"student": "light.pt"}, lwcompile.NotAModuleError, "student must be an nn.Module"),
    ({"teacher": None}, lwcompile.NotAModuleError, "teacher must be an nn.Module"),
    ({"steps": "10"}, lwcompile.ArgumentError, "steps must be an int"),
    ({"steps": -1}, lwcompile.ArgumentError, "steps must be >= 0"),
    ({"lr": "fast"}, lwcompile.ArgumentError, "lr must be a number"),
    ({"lr": 0}, lwcompile.ArgumentError, "lr must be > 0"),
    ({"batch_size": 0}, lwcompile.ArgumentError, "batch_size must be >= 1"),
    ({"batch_size": 2.5}, lwcompile.ArgumentError, "batch_size must be an int"),
    ({"crop": "40"}, lwcompile.ArgumentError, "crop must be an int"),
    ({"channels": 0}, lwcompile.ArgumentError, "channels must be >= 1"),
    ({"seed": None}, lwcompile.ArgumentError, "seed must be an int"),
    ({"degrade": 25}, lwcompile.ArgumentError, "degrade must be a function"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), TRAIN_BAD)
@pytest.mark.parametrize("entry", [lwcompile.distill, lwcompile.init_layerwise])
def test_training_arguments(entry, kwargs, error, message, light):
    call = {"student": light, "teacher": tiny(), **kwargs}
    student, teacher = call.pop("student"), call.pop("teacher")
    with pytest.raises(error, match=f"{entry.__name__}: {message}"):
        entry(student, teacher, torch.rand(1, 3, 32, 32), progress=False, **call) \
            if entry is lwcompile.distill else entry(student, teacher, torch.rand(1, 3, 32, 32),
                                                     **call)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"checkpoint": 5}, "checkpoint must be a file path"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"loss": "huber"}, "loss must be one of"),
    ({"stop_when": 5}, "stop_when must be a function"),
    ({"lr_schedule": 0.5}, "lr_schedule must be"),
])
def test_distill_only_arguments(kwargs, message, light):
    with pytest.raises(lwcompile.LwCompileError, match=message):
        lwcompile.distill(light, tiny(), torch.rand(1, 3, 32, 32), 1, progress=False, **kwargs)


# --- Class 4: raw errors from entry points other than lighten -------------------------------


@pytest.mark.parametrize("entry", ["distill", "init_layerwise"])
def test_training_images_of_the_wrong_channel_count(entry, light):
    data = torch.rand(2, 1, 40, 40)  # grey images, and channels=1, for an RGB model
    with pytest.raises(lwcompile.TrainingError, match=r"teacher.*cannot run on a training "
                                                      r"batch of shape 2x1x"):
        if entry == "distill":
            lwcompile.distill(light, tiny(), data, 2, crop=None, batch_size=2, channels=1,
                              progress=False)
        else:
            lwcompile.init_layerwise(light, tiny(), data, steps=1, crop=None, batch_size=2,
                                     channels=1)


def test_distill_teacher_whose_output_shape_differs(light):
    teacher = nn.Conv2d(3, 1, 3, padding=1)
    with pytest.raises(lwcompile.TrainingError, match=r"student's output 2x3x32x32.*teacher's "
                                                      r"2x1x32x32"):
        lwcompile.distill(light, teacher, torch.rand(2, 3, 32, 32), 1, crop=None,
                          batch_size=2, progress=False)


def test_init_layerwise_teacher_of_another_architecture(light):
    with pytest.raises(lwcompile.TrainingError, match="teacher .*OtherNet.* has no module "
                                                      "'2'"):
        lwcompile.init_layerwise(light, OtherNet(), torch.rand(2, 3, 32, 32), steps=1,
                                 crop=None, batch_size=2)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a distill checkpoint"),
    (b"garbage, not a pickle", "not a distill checkpoint"),
    (pickle.dumps({"a": 1}, protocol=2), "not a distill checkpoint"),
])
def test_distill_resume_from_a_corrupt_checkpoint(content, message, tmp_path, light):
    path = tmp_path / "run.pt"
    path.write_bytes(content)
    with pytest.raises(lwcompile.CheckpointError, match=message):
        lwcompile.distill(light, tiny(), torch.rand(2, 3, 32, 32), 1, crop=None,
                          batch_size=2, checkpoint=path, progress=False)
    assert path.read_bytes() == content


def test_distill_resume_from_a_foreign_checkpoint(tmp_path, light):
    path = tmp_path / "run.pt"
    torch.save({"model": tiny().state_dict()}, path)  # a plain state_dict holder
    with pytest.raises(lwcompile.CheckpointError, match="no 'student'"):
        lwcompile.distill(light, tiny(), torch.rand(2, 3, 32, 32), 1, crop=None,
                          batch_size=2, checkpoint=path, progress=False)


def test_distill_resume_from_another_students_checkpoint(tmp_path, light):
    path = tmp_path / "run.pt"
    other = OtherNet()
    lwcompile.distill(other, OtherNet(), torch.rand(2, 3, 32, 32), 1, crop=None,
                      batch_size=2, checkpoint=path, progress=False)
    with pytest.raises(lwcompile.CheckpointError, match="another model"):
        lwcompile.distill(light, tiny(), torch.rand(2, 3, 32, 32), 2, crop=None,
                          batch_size=2, checkpoint=path, progress=False)


def missing_folder(tmp_path: Path) -> Path:
    return tmp_path / "no" / "such" / "folder"


def read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


needs_permissions = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                       reason="root writes anywhere")


@pytest.mark.parametrize("folder", [missing_folder,
                                    pytest.param(read_only_folder, marks=needs_permissions)])
def test_write_atomic_refuses_a_missing_or_read_only_folder(folder, tmp_path):
    from lwcompile.files import write_atomic

    where = folder(tmp_path)
    with pytest.raises(lwcompile.DestinationError, match=f"cannot write {where}"):
        write_atomic(where / "a.bin", lambda f: f.write(b"x"))
    assert not (where / "a.bin").exists()
    assert not missing_folder(tmp_path).parent.exists()  # no folder was created


@pytest.mark.parametrize("folder", [missing_folder,
                                    pytest.param(read_only_folder, marks=needs_permissions)])
@pytest.mark.parametrize("writer", ["save", "write_html", "distill", "export_program_onnx"])
def test_every_writer_refuses_a_missing_or_read_only_folder(writer, folder, tmp_path, light):
    where = folder(tmp_path)
    with pytest.raises(lwcompile.LwCompileError, match=str(where)):
        if writer == "save":
            lwcompile.save(light, where / "a.pt")
        elif writer == "write_html":
            lwcompile.write_html(light.lwcompile_report.to_dict(), where / "a.html")
        elif writer == "distill":
            lwcompile.distill(light, tiny(), torch.rand(2, 3, 32, 32), 1, crop=None,
                              batch_size=2, checkpoint=where / "run.pt", progress=False)
        else:
            pytest.importorskip("onnx")
            lwcompile.export_onnx(light, X, where / "a.onnx")
    assert not missing_folder(tmp_path).exists()


def test_save_file_whose_header_parses_but_payload_is_garbage(tmp_path, light):
    from lwcompile.deploy import pickle_file as persist  # the pickle format, behind trust

    path = lwcompile.save(light, tmp_path / "a.pt", format="pickle")
    data = path.read_bytes()
    header, payload = persist.read(path, data)
    garbage = b"\x80\x04garbage, not a pickle" + b"\0" * 10
    import hashlib
    import json
    header["payload_bytes"], header["payload_sha256"] = (len(garbage),
                                                         hashlib.sha256(garbage).hexdigest())
    text = json.dumps(header).encode()
    path.write_bytes(persist.MAGIC + persist._LENGTH.pack(len(text)) + text + garbage)
    assert data != path.read_bytes()
    with pytest.raises(lwcompile.SaveFileError, match="the model cannot be rebuilt here"):
        lwcompile.load(path, trust=True)


def test_save_file_holding_something_else_than_a_module(tmp_path, light):
    from lwcompile.deploy import pickle_file as persist  # the pickle format, behind trust

    path = lwcompile.save(light, tmp_path / "a.pt", format="pickle")
    header, _ = persist.read(path, path.read_bytes())
    import hashlib
    import io
    import json
    buffer = io.BytesIO()
    torch.save({"not": "a module"}, buffer)
    payload = buffer.getvalue()
    header["payload_bytes"], header["payload_sha256"] = (len(payload),
                                                         hashlib.sha256(payload).hexdigest())
    text = json.dumps(header).encode()
    path.write_bytes(persist.MAGIC + persist._LENGTH.pack(len(text)) + text + payload)
    with pytest.raises(lwcompile.SaveFileError, match="the payload does not match its header"):
        lwcompile.load(path, trust=True)


WRONG_CHANNELS = (torch.rand(1, 1, 16, 16),)


@pytest.mark.parametrize("entry", ["emit_fast", "export_program", "export_onnx", "profile",
                                   "count_macs", "export_onnx_int8"])
def test_example_inputs_of_the_wrong_channel_count(entry, light, tmp_path):
    before = {k: v.clone() for k, v in light.state_dict().items()}
    name = entry.removesuffix("_int8")
    with pytest.raises(lwcompile.ExampleInputError,
                       match=rf"{name}: .* rejects the example input \(1x1x16x16\).*channels"):
        if entry.startswith("export_onnx"):
            pytest.importorskip("onnx")
            precision = "int8" if entry.endswith("int8") else "fp32"
            if precision == "int8":
                pytest.importorskip("onnxruntime")
            lwcompile.export_onnx(light, WRONG_CHANNELS, tmp_path / "a.onnx",
                                  precision=precision)
        elif entry == "count_macs":
            lwcompile.count_macs(light, *WRONG_CHANNELS)
        else:
            getattr(lwcompile, entry)(light, WRONG_CHANNELS)
    assert all(torch.equal(before[k], v) for k, v in light.state_dict().items())
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.parametrize("folder", ["no/such/folder", "a_file.png"])
def test_an_image_folder_that_is_missing_or_a_file(folder, tmp_path, light):
    (tmp_path / "a_file.png").write_bytes(b"not an image")
    where = tmp_path / folder
    with pytest.raises(lwcompile.LwCompileError, match=f"{where} is not a folder"):
        lwcompile.load_folder(where)
    with pytest.raises(lwcompile.LwCompileError, match=f"{where} is not a folder"):
        lwcompile.distill(light, tiny(), str(where), 1, progress=False)


def rewritten_header(path: Path, **changes) -> Path:
    """``path`` (a pickle save file) with header fields replaced, the payload kept intact."""
    import json

    from lwcompile.deploy import pickle_file as persist

    header, payload = persist.read(path, path.read_bytes())
    header.update(changes)
    text = json.dumps(header).encode()
    path.write_bytes(persist.MAGIC + persist._LENGTH.pack(len(text)) + text + payload)
    return path


GARBAGE_HEADERS = [
    ({"report": "garbage"}, "report"), ({"report": [1, 2]}, "report"),
    ({"report": {"rows": 5}}, "report"), ({"report": {"rows": [{"x": 1}]}}, "report"),
    ({"class_name": 5}, "class_name"), ({"params": "many"}, "params"),
]


@pytest.mark.parametrize(("changes", "field"), GARBAGE_HEADERS)
@pytest.mark.parametrize("entry", ["info", "load", "cli report", "cli report --html"])
def test_a_header_that_parses_but_holds_garbage(entry, changes, field, tmp_path, light,
                                                capsys):
    path = rewritten_header(lwcompile.save(light, tmp_path / "a.pt", format="pickle"),
                            **changes)
    message = f"{path} is corrupt: the header's {field} is unreadable"
    if entry.startswith("cli"):
        argv = ["report", str(path), "-q"]
        if entry.endswith("--html"):
            argv += ["--html", str(tmp_path / "r.html"), "--no-crops"]
        assert main(argv) == cli_app.EXIT_REFUSED
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r.html").exists()
    else:
        with pytest.raises(lwcompile.SaveFileError, match=message):
            getattr(lwcompile, entry)(path)


# --- Class 6: the command line ----------------------------------------------------------------


def crash(args):
    raise AttributeError("'NoneType' object has no attribute 'weight'")


@pytest.fixture
def crashing_profile(monkeypatch):
    monkeypatch.setattr(cli_app.commands, "profile", crash)


def test_cli_unexpected_error_is_one_line_and_its_own_exit_code(crashing_profile, capsys):
    code = main(["profile", "x:y"])
    err = capsys.readouterr().err
    assert code == cli_app.EXIT_CRASHED == 3
    assert code not in (cli_app.EXIT_OK, cli_app.EXIT_REFUSED, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "unexpected error" in lines[0] and "AttributeError" in lines[0]
    assert "--debug" in lines[0]


def test_cli_debug_shows_the_traceback(crashing_profile, capsys):
    code = main(["--debug", "profile", "x:y"])
    err = capsys.readouterr().err
    assert code == cli_app.EXIT_CRASHED
    assert "Traceback (most recent call last)" in err and "in crash" in err


def test_cli_unexpected_error_as_json(crashing_profile, capsys):
    import json

    code = main(["profile", "x:y", "--json"])
    out = capsys.readouterr().out
    assert code == cli_app.EXIT_CRASHED
    assert json.loads(out)["error"]["type"] == "AttributeError"


def test_cli_refusal_keeps_exit_code_1(monkeypatch, capsys):
    def refuse(args):
        raise lwcompile.NothingToLighten("nothing to lighten", None)
    monkeypatch.setattr(cli_app.commands, "profile", refuse)
    assert main(["profile", "x:y"]) == cli_app.EXIT_REFUSED == 1
    assert capsys.readouterr().err.strip() == "lwcompile: error: nothing to lighten"


def test_cli_help_documents_every_exit_code(capsys):
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "0 ok, 1 lwcompile refused (the message says why), 2 usage error, " \
           "3 unexpected error (a bug: rerun with --debug for the traceback)" in out
    docs = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert "--debug" in docs.read_text() and "3 unexpected error" in docs.read_text()


def _tiny_factory_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``folder``, where ``lwc_tiny_misuse:build`` is a small three-conv factory."""
    tiny_factory_in(folder, monkeypatch, "lwc_tiny_misuse")


@pytest.mark.parametrize("argv", [
    ["report", "{missing}/a.pt"],
    ["report", "{garbage}"],
    ["lighten", "lwc_tiny_misuse:build", "-o", "{missing}/light.pt", "--input", "1x3x16x16"],
])
def test_cli_file_problems_are_refusals_not_crashes(argv, tmp_path, monkeypatch, capsys):
    _tiny_factory_in(tmp_path, monkeypatch)
    (tmp_path / "garbage.pt").write_bytes(b"LWCOMPILE\x00SAVE\n" + b"\xff" * 40)
    argv = [a.format(missing=tmp_path / "no" / "such", garbage=tmp_path / "garbage.pt")
            for a in argv]
    code = main([*argv, "-q"])
    err = capsys.readouterr().err
    assert code == cli_app.EXIT_REFUSED, err
    assert err.startswith("lwcompile: error: ") and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["report", "light.pt", "--html", "r.html", "--data", "no_such_folder", "--trust-pickle"],
    ["lighten", "lwc_tiny_misuse:build", "-o", "o.pt", "--input", "1x3x16x16", "--distill",
     "1", "--data", "no_such_folder"],
])
def test_cli_missing_data_folder_is_a_refusal(argv, tmp_path, monkeypatch, capsys, light):
    _tiny_factory_in(tmp_path, monkeypatch)
    lwcompile.save(light, tmp_path / "light.pt", format="pickle")
    code = main([*argv, "-q"])
    err = capsys.readouterr().err
    assert code == cli_app.EXIT_REFUSED, err
    assert "no_such_folder is not a folder" in err


# --- Class 7: smaller things users still expect (files) --------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_of_the_umask(umask, tmp_path, light):
    old = os.umask(umask)
    try:
        saved = [lwcompile.save(light, tmp_path / "a.pt"),
                 lwcompile.write_html(light.lwcompile_report.to_dict(), tmp_path / "a.html")]
    finally:
        os.umask(old)
    for path in saved:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_overwriting_keeps_the_files_own_mode(tmp_path, light):
    path = lwcompile.save(light, tmp_path / "a.pt")
    path.chmod(0o640)
    lwcompile.save(light, path)
    assert path.stat().st_mode & 0o777 == 0o640


def _leftover(folder: Path, name: str, owner: str) -> Path:
    from lwcompile import files

    host = files._host() if owner != "foreign" else "some-other-host"
    pid = {"dead": 2**22 + 12345, "alive": os.getppid(), "foreign": 7}[owner]
    temp = folder / f".{name}.{host}.{pid}.0badc0de{files.TEMP_SUFFIX}"
    temp.write_bytes(b"half a save")
    return temp


@pytest.mark.parametrize("writer", ["save", "write_html", "write_atomic"])
def test_a_killed_save_leaves_no_temp_file_for_ever(writer, tmp_path, light):
    """A save killed by SIGKILL cannot clean up; the next save of the same file does."""
    from lwcompile.files import write_atomic

    name = {"save": "a.pt", "write_html": "a.html", "write_atomic": "a.bin"}[writer]
    stale = _leftover(tmp_path, name, "dead")
    foreign_old = _leftover(tmp_path, name, "foreign")
    os.utime(foreign_old, (0, 0))
    foreign_recent = tmp_path / f".{name}.some-other-host.8.0badc0de.lwtmp"
    foreign_recent.write_bytes(b"maybe still being written")
    live = _leftover(tmp_path, name, "alive")  # a save in progress in a live process
    of_another_file = _leftover(tmp_path, "other.pt", "dead")
    if writer == "save":
        lwcompile.save(light, tmp_path / name)
    elif writer == "write_html":
        lwcompile.write_html(light.lwcompile_report.to_dict(), tmp_path / name)
    else:
        write_atomic(tmp_path / name, lambda f: f.write(b"x"))
    assert not stale.exists() and not foreign_old.exists()
    assert live.exists() and foreign_recent.exists() and of_another_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [name]


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    from lwcompile.files import write_atomic

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.bin", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_process_really_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    """The real thing: a child process SIGKILLed in the middle of write_atomic."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\nfrom lwcompile.files import write_atomic\n"
            "def slow(f):\n    f.write(b'part'); f.flush(); print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            f"write_atomic({str(tmp_path / 'a.bin')!r}, slow)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.05)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".lwtmp")]
    assert len(leftovers) == 1 and not (tmp_path / "a.bin").exists()
    from lwcompile.files import write_atomic

    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == b"whole"
