"""scripts/serve's helpers: the host-log filter (on a startup log captured from our host) and the demo aliases."""
from pathlib import Path

from comfyui_astria.tools import host_log_filter, install_demo

STARTUP_LOG = Path(__file__).parent / "data" / "host_0.3.75_startup.log"  # ./scripts/serve's output before the filter


def test_the_captured_startup_loses_its_tracebacks_and_nothing_else():
    log = STARTUP_LOG.read_text()
    assert log.count("Traceback (most recent call last):") == 2 and "IMPORT FAILED" in log
    filtered = host_log_filter.filter_text(log)
    assert "Traceback" not in filtered and "IMPORT FAILED" not in filtered and "torchaudio missing" not in filtered
    assert filtered.count(host_log_filter.NOTE) == 1
    assert "0.8 seconds: /root/.cache/comfyui-astria/run/1399891233/custom_nodes/ComfyUI-Astria" in filtered
    assert filtered.endswith("To see the GUI go to: http://127.0.0.1:8391\n")


def test_fed_in_small_pieces_it_prints_the_same():
    log = STARTUP_LOG.read_text()
    pieces = host_log_filter.HostLogFilter()
    out = "".join(pieces.feed(log[i:i + 7]) for i in range(0, len(log), 7)) + pieces.close()
    assert out == host_log_filter.filter_text(log)


def test_a_progress_bar_shows_before_its_line_ends():
    pieces = host_log_filter.HostLogFilter()
    assert pieces.feed("\r 50%|#####     | 1/2") == "\r 50%|#####     | 1/2"
    assert pieces.feed("\r100%|##########| 2/2\n") == "\r100%|##########| 2/2\n"
    assert pieces.feed("Prompt executed in 1.0 seconds\n") == "Prompt executed in 1.0 seconds\n"


def test_other_tracebacks_and_import_failures_stay():
    other = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
             "ModuleNotFoundError: No module named 'cv2'\n\nCannot import x.py module for custom nodes: No module "
             "named 'cv2'\n\nWARNING: some comfy_extras/ nodes did not import correctly. This may be because they "
             "are missing some dependencies.\n\nIMPORT FAILED: x.py\n\nThis issue might be caused by new missing "
             "dependencies added the last time you updated ComfyUI.\nPlease do a: pip install -r requirements.txt\n\n")
    assert host_log_filter.filter_text(other) == other


def test_demo_aliases_keep_the_users_entries_and_move_the_earlier_demo_lora():
    merged = install_demo.merged_aliases({"more_details": "mine.safetensors",
                                          "SDXLrender_v2.0": install_demo.EARLIER_DEMO_LORA})
    assert merged["more_details"] == "mine.safetensors"
    assert merged["SDXLrender_v2.0"] == install_demo.DEMO_LORA == "tiny_sd15_demo_lora.safetensors"
