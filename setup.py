"""The project's data folders (``schedules/``, ``tuning_logs/``) stay at the top of the repository; a built
package carries a copy as ``lsr_compile/_data/`` so an installed lsr_compile finds its schedule spaces and
shipped tuning logs (``lsr_compile/shipped.py``). Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = {"schedules": "*.json", "tuning_logs": "**/*.jsonl"}


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for folder, pattern in DATA.items():
            for src in sorted((here / folder).glob(pattern)):
                dest = Path(self.build_lib) / "lsr_compile" / "_data" / src.relative_to(here)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


setup(cmdclass={"build_py": BuildPyWithData})
