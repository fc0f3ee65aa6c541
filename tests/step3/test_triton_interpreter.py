"""The Triton kernel test files' CPU cases, run through Triton's interpreter in one subprocess.

`TRITON_INTERPRET=1` only takes effect if it is set before Triton is first imported, and this pytest process has
imported it already (see `triton_cases.py`). So the kernel files run again in one `TRITON_INTERPRET=1` pytest
subprocess, all together: each Python process spends over 15 s of a 2-core CI machine importing transformers and
collecting, and one process per file spent that eight times. Each file's outcome is its own test here, read from the
subprocess's JUnit report. To run one file's interpreted cases by hand: `TRITON_INTERPRET=1 python -m pytest FILE`.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from triton_cases import skip_if_interpreted

HERE = Path(__file__).resolve().parent
KERNEL_TEST_FILES = [
    "test_decode_kernel.py",
    "test_paged_attention.py",
    "test_moe_decode.py",
    "test_moe_router.py",
    "test_fp8_decode_linear.py",
    "test_decode_linear.py",
    "test_fp8_activation_quant.py",
    "test_rms_norm.py",
    "test_rotary.py",
    "test_fp8_wire.py",
]

pytestmark = skip_if_interpreted


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, dict]:
    """file -> {"passed": [test], "failed": [test: message], "skipped": n, "output": the subprocess's output's end},
    and "returncode" -> the subprocess's exit status."""
    report = tmp_path_factory.mktemp("interpreted") / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    files = [str(HERE / name) for name in KERNEL_TEST_FILES]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", f"--junitxml={report}",
         *files],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    output = result.stdout[-6000:] + result.stderr[-2000:]
    outcomes = {name: {"passed": [], "failed": [], "skipped": 0, "output": output} for name in KERNEL_TEST_FILES}
    if report.exists():
        for case in ElementTree.parse(report).iter("testcase"):
            name = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
            if name not in outcomes:
                continue
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                outcomes[name]["failed"].append(f"{case.get('name')}: {problem.get('message', '')[:500]}")
            elif case.find("skipped") is not None:
                outcomes[name]["skipped"] += 1
            else:
                outcomes[name]["passed"].append(case.get("name"))
    return {**outcomes, "returncode": result.returncode, "output": output}


@pytest.mark.parametrize("test_file", KERNEL_TEST_FILES)
def test_cpu_cases_under_triton_interpreter(interpreted, test_file):
    outcome = interpreted[test_file]
    assert not outcome["failed"], "\n".join(outcome["failed"]) + "\n" + outcome["output"]
    # the kernel cases are the ones parametrised over the interpreter's device
    kernel_cases = [name for name in outcome["passed"] if "cpu" in name]
    assert kernel_cases, f"no kernel case of {test_file} ran under the interpreter:\n{outcome['output']}"


def test_the_interpreted_session_ends_cleanly(interpreted):
    # 1 = some case failed (reported per file above); anything else is an error outside the cases (collection,
    # a crash, an interruption) that no file's outcome would show.
    failed = any(interpreted[name]["failed"] for name in KERNEL_TEST_FILES)
    assert interpreted["returncode"] == (1 if failed else 0), interpreted["output"]
