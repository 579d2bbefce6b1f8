"""The documentation is the contract: the lists it gives of what the C code
says are checked against the C code, so the two cannot drift apart."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
C = ROOT / "src" / "aiorun" / "_aiorun"


DOCS = ROOT / "docs"


def page_text(name):
    # Lines are wrapped in the pages: compare with single spaces.
    return " ".join((DOCS / name).read_text().split())


def c_table(path, name):
    """The string literals of `static const char *const name[] = {...}`."""
    text = (C / path).read_text()
    body = re.search(name + r"\[\] = \{(.*?)\};", text, re.S).group(1)
    return re.findall(r'\] = "([^"]+)"', body)


def test_every_watchdog_phase_is_in_the_deadline_guide():
    phases = c_table("watchdog.c", "stage_names")
    assert len(phases) == 12
    text = page_text("guide/deadline.md")
    missing = [p for p in phases if f"`{p}`" not in text]
    assert not missing, missing


def test_every_systemd_status_phase_is_in_the_systemd_guide():
    phases = c_table("notify.c", "phase_status")
    assert "letting tasks finish" in phases
    text = page_text("guide/systemd.md")
    missing = [p for p in phases if f"`{p}`" not in text]
    assert not missing, missing


def test_what_differs_lists_exactly_the_accepted_differences():
    # tests/differences.py is the one list of accepted differences from the
    # original; the "What differs" page names the same, one to one.
    from differences import ACCEPTED
    text = (DOCS / "differences.md").read_text()
    section = text.split("# What differs from aiorun 2025.1.1", 1)[1]
    section = section.split("### Choices where the specification is silent", 1)[0]
    section = " ".join(section.split())
    leads = re.findall(r"(?:^| )- \*\*(.+?)\*\*", section)
    assert len(leads) == len(set(leads))
    assert sorted(leads) == sorted(ACCEPTED)


def test_every_systemd_unit_of_the_guide_is_driven_by_a_test():
    """The systemd guide shows the units make test-systemd uses, verbatim
    (they are written from it); each has its test, and each app exists."""
    spec = importlib.util.spec_from_file_location("units", ROOT / "tests/systemd/units.py")
    units = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(units)
    shown = units.units(DOCS / "guide" / "systemd.md")
    tests = (ROOT / "tests/systemd/test_under_systemd.py").read_text()
    driven = set(re.findall(r'\["(aiorun-[\w-]+\.service)"\], indirect=True', tests))
    services = {name for name in shown if name.endswith(".service")}
    assert services == driven
    # A socket unit is there for the service of its name.
    for name in set(shown) - services:
        assert name.replace(".socket", ".service") in services, name
    for text in shown.values():
        for app in re.findall(r"/opt/app/(\w+\.py)", text):
            assert (ROOT / "tests/systemd/apps" / app).exists(), app
