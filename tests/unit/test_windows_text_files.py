"""Text files a user writes with Windows tools read like plain UTF-8 wherever the project reads a user's text: UTF-8
with a byte-order mark (Notepad; Excel's "CSV UTF-8"), UTF-16 with one (PowerShell's ``>``), CRLF line ends
(megatron_puffin/files.py ``decode_text``). Before, the mark stuck to the first name: generate.py's Excel CSV was
"unknown field '\\ufeffid'", the camera ground truth "lacks the columns ['fname']", an understand.py image list named
a missing '\\ufeffa.jpg', a Puffin-4M summary was "not valid JSON"; flag files are in test_flag_mistakes.py."""
import importlib.util
import json

import pytest

from helpers.puffin import ROOT
from megatron_puffin.data.puffin4m import SubsetLayout, load_summary
from megatron_puffin.evaluation.camera_metrics import read_ground_truth, read_predictions
from megatron_puffin.files import decode_text

ENCODINGS = {
    "utf-8": lambda text: text.encode("utf-8"),
    "utf-8-bom": lambda text: text.encode("utf-8-sig"),
    "utf-16-le-bom": lambda text: b"\xff\xfe" + text.encode("utf-16-le"),
    "utf-16-be-bom": lambda text: b"\xfe\xff" + text.encode("utf-16-be"),
}


def _tool(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_bom_tool"), ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_text_takes_the_byte_order_marks_and_nothing_else():
    text = "id,caption\r\nA,\u00e9t\u00e9 \u6771\u4eac\r\n"
    for encode in ENCODINGS.values():
        assert decode_text(encode(text)) == text
    with pytest.raises(UnicodeDecodeError):
        decode_text("caf\u00e9".encode("latin-1"))  # not guessed: Latin-1 stays an error naming the file


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_user_files_saved_by_windows_tools_read_like_plain_ones(tmp_path, encoding):
    encode = ENCODINGS[encoding]
    # generate.py --prompts: an Excel CSV and a JSON file
    generate = _tool("generate.py")
    (tmp_path / "requests.csv").write_bytes(encode("id,caption,roll,pitch,vfov\r\nk1,\"A room, lit\",0.1,0,1.0\r\n"))
    assert generate._read_rows(tmp_path / "requests.csv") == [
        {"id": "k1", "caption": "A room, lit", "roll": "0.1", "pitch": "0", "vfov": "1.0"}]
    (tmp_path / "requests.json").write_bytes(encode(json.dumps([{"id": "k2", "caption": "x"}])))
    assert generate._read_rows(tmp_path / "requests.json") == [{"id": "k2", "caption": "x"}]
    # understand.py --images LIST.txt
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "images.txt").write_bytes(encode("a.jpg\r\n"))
    assert _tool("understand.py").collect_images([str(tmp_path / "images.txt")]) == [tmp_path / "a.jpg"]
    # evaluate_camera.py --ground-truth and --predictions
    (tmp_path / "cameras.csv").write_bytes(encode("fname,roll,pitch,vfov,yaw,width,height\r\na.jpg,0.1,0,1,,96,96\r\n"))
    assert read_ground_truth(tmp_path / "cameras.csv")["a.jpg"].roll == pytest.approx(0.1)
    (tmp_path / "pred.json").write_bytes(encode(json.dumps([{"id": "a.jpg", "output_text": "roll 0.1"}])))
    assert read_predictions(tmp_path / "pred.json") == [("a.jpg", "roll 0.1")]
    # preprocess_data.py: a Puffin-4M summary file
    (tmp_path / "summary.json").write_bytes(encode(json.dumps([{"annotation": "cap/0.json"}])))
    assert load_summary(SubsetLayout("main", tmp_path)) == [{"annotation": "cap/0.json"}]
