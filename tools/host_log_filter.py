"""Pass ComfyUI's console output through, minus its complaints that torchaudio is missing, with one sentence instead.

The host scripts/serve builds has no torchaudio: none on PyPI matches its torch, and the pack uses no audio. ComfyUI
then prints two import tracebacks (comfy_extras/nodes_audio.py, nodes_audio_encoder.py), "torchaudio missing, ...
will be broken" lines and an "IMPORT FAILED ... Please do a: pip install -r requirements.txt" block, which read as
a failed setup. This filter drops exactly those (a traceback only when it ends in "No module named 'torchaudio'"; the
IMPORT FAILED block only when every module it lists failed that way) and passes everything else through as it comes,
partial lines (progress bars) included.
Usage: main.py ... 2>&1 | python tools/host_log_filter.py
"""
import codecs
import os
import re
import signal
import sys

NOTE = ("[astria] ComfyUI's audio nodes are off on this host: no torchaudio on PyPI matches its torch, and the pack "
        "needs none (their import errors are hidden)\n")
TRACEBACK_START = "Traceback (most recent call last):"
TRACEBACK_LINKS = ("During handling of the above exception", "The above exception was the direct cause")
TORCHAUDIO_MISSING = "ModuleNotFoundError: No module named 'torchaudio'"
MISSING_LINE = re.compile(r"^torchaudio missing, .* will be broken$")
CANNOT_IMPORT = re.compile(r"^Cannot import (?P<path>.+) module for custom nodes: No module named 'torchaudio'$")
SUMMARY_START = "WARNING: some comfy_extras/ nodes did not import correctly"
SUMMARY_FAILED = re.compile(r"^IMPORT FAILED: (?P<name>.+)$")
SUMMARY_LAST = ("Please do a: pip install -r requirements.txt", "Please run the update script")
MARKERS = (TRACEBACK_START, "torchaudio missing", "Cannot import ", SUMMARY_START)


class HostLogFilter:
    """Line-level state machine: feed() text as it arrives, get back what to print."""

    def __init__(self):
        self.block = []  # a traceback or IMPORT FAILED block held until it is known to be torchaudio's
        self.state = "normal"  # normal | traceback | summary
        self.hidden_modules = set()  # file names whose torchaudio import failure was hidden
        self.noted = False
        self.skip_blank = False  # the blank line ComfyUI logs after a traceback it hid
        self.partial = ""  # the current line's start, not yet printed
        self.partial_shown = False  # the current line's start was already printed
        self._shown = ""  # that start

    def _note(self) -> str:
        if self.noted:
            return ""
        self.noted = True
        return NOTE

    def _line(self, line: str) -> str:
        """What to print for one complete line (without its newline); '' for nothing."""
        if self.state == "traceback":
            self.block.append(line)
            if line.startswith(TRACEBACK_START) or line.startswith((" ", "\t")) or not line.strip() \
                    or line.startswith(TRACEBACK_LINKS):
                return ""
            self.state = "normal"
            block, self.block = self.block, []
            if line.strip() == TORCHAUDIO_MISSING:
                self.skip_blank = True
                return self._note()
            return "".join(f"{held}\n" for held in block)
        if self.state == "summary":
            self.block.append(line)
            if not line.startswith(SUMMARY_LAST):
                return ""
            self.state = "normal"
            block, self.block = self.block, []
            failed = [match["name"] for match in map(SUMMARY_FAILED.match, block) if match]
            if failed and all(name in self.hidden_modules for name in failed):
                self.skip_blank = True
                return ""
            return "".join(f"{held}\n" for held in block)
        if self.skip_blank:
            self.skip_blank = False
            if not line.strip():
                return ""
        if line.startswith(TRACEBACK_START):
            self.state, self.block = "traceback", [line]
            return ""
        if MISSING_LINE.match(line):
            return self._note()
        cannot = CANNOT_IMPORT.match(line)
        if cannot:
            self.hidden_modules.add(os.path.basename(cannot["path"]))
            self.skip_blank = False
            return self._note()
        if line.startswith(SUMMARY_START):
            self.state, self.block = "summary", [line]
            return ""
        return f"{line}\n"

    def feed(self, text: str) -> str:
        """What to print now for this much more output."""
        out = []
        text = self.partial + text
        *lines, self.partial = text.split("\n")
        for line in lines:
            if self.partial_shown:  # its start is printed already: print the rest as it is
                out.append(line[len(self._shown):] + "\n")
                self.partial_shown = False
                continue
            out.append(self._line(line))
        if self.partial and self.state == "normal" and not self.partial_shown and not self.skip_blank \
                and not any(marker.startswith(self.partial) or self.partial.startswith(marker) for marker in MARKERS):
            out.append(self.partial)  # a progress bar (\r updates, no newline yet): show it now
            self.partial_shown, self._shown = True, self.partial
        elif self.partial_shown and len(self.partial) > len(self._shown):
            out.append(self.partial[len(self._shown):])
            self._shown = self.partial
        return "".join(out)

    def close(self) -> str:
        """What is left at the end of the output (a block cut short is printed as it was)."""
        rest = "".join(f"{held}\n" for held in self.block)
        if self.partial:
            rest += self.partial[len(self._shown):] if self.partial_shown else self.partial
        self.block, self.partial, self.partial_shown = [], "", False
        return rest


def filter_text(text: str) -> str:
    """The whole output, filtered (for tests and saved logs)."""
    log_filter = HostLogFilter()
    return log_filter.feed(text) + log_filter.close()


def main() -> None:
    """Filter stdin to stdout as it arrives; Ctrl+C is left to ComfyUI, which then ends our input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_filter = HostLogFilter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    while True:
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            break
        sys.stdout.write(log_filter.feed(decoder.decode(chunk)))
        sys.stdout.flush()
    sys.stdout.write(log_filter.feed(decoder.decode(b"", final=True)) + log_filter.close())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
