"""Node vitals: the readers against fake /proc and /sys trees (present, absent, garbled), and the real ones here."""

from __future__ import annotations

from pathlib import Path

from fixtures_netns import fake_vitals_roots

from edged.vitals import Vitals, VitalsReader


def reader(proc: Path, sysfs: Path) -> VitalsReader:
    return VitalsReader(str(proc), str(sysfs))


def test_a_box_on_battery_reports_its_charge_and_battery_power(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path, battery=10, status="Discharging", mains=False)
    vitals = reader(proc, sysfs).read()
    assert (vitals.bat, vitals.power) == (10, "battery")
    assert vitals.meta() == (("bat", "10"), ("cpu", "0"), ("link", ""), ("power", "battery"))


def test_a_charging_battery_or_an_online_supply_means_mains(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path / "a", battery=80, status="Charging")
    assert reader(proc, sysfs).battery() == (80, "mains")
    proc, sysfs = fake_vitals_roots(tmp_path / "b", battery=55, status="Unknown", mains=True)
    assert reader(proc, sysfs).battery() == (55, "mains")
    proc, sysfs = fake_vitals_roots(tmp_path / "c", mains=True)  # a Pi on its power adapter: no battery at all
    assert reader(proc, sysfs).battery() == (None, "mains")


def test_absent_hardware_is_unknown_never_zero(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path)
    vitals = reader(proc, sysfs).read()
    assert (vitals.bat, vitals.power, vitals.link) == (None, "", None)
    assert vitals.txt() == {"cpu": "0", "bat": "", "pwr": "", "link": ""}
    # No /sys and no /proc at all (a stripped container): everything unknown, nothing raised.
    nothing = VitalsReader(str(tmp_path / "none-proc"), str(tmp_path / "none-sys")).read()
    assert nothing == Vitals()


def test_garbled_files_degrade_to_unknown(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path, battery=50, mains=True)
    bat = sysfs / "class" / "power_supply" / "BAT0"
    (bat / "capacity").write_text("lots\n")
    (sysfs / "class" / "power_supply" / "AC" / "online").write_text("maybe\n")
    (bat / "status").write_text("\x00\xff")
    (sysfs / "class" / "power_supply" / "junk").mkdir()  # no type file
    (proc / "loadavg").write_text("not a number\n")
    (proc / "stat").write_text("intr 1 2 3\n")
    (proc / "net" / "wireless").write_text("header\nheader\n wlan0: 0000 zz. -56. -256\n garbage line\n")
    vitals = reader(proc, sysfs).read()
    assert vitals == Vitals()


def test_battery_charge_from_energy_counters_and_device_batteries_are_ignored(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path, battery=90, status="Discharging")
    bat = sysfs / "class" / "power_supply" / "BAT0"
    (bat / "capacity").unlink()
    (bat / "energy_now").write_text("30000000\n")
    (bat / "energy_full").write_text("40000000\n")
    mouse = sysfs / "class" / "power_supply" / "hidpp_battery_0"
    mouse.mkdir()
    (mouse / "type").write_text("Battery\n")
    (mouse / "scope").write_text("Device\n")
    (mouse / "capacity").write_text("5\n")
    assert reader(proc, sysfs).battery() == (75, "battery")


def test_wifi_link_quality_from_proc_net_wireless(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path, wifi_quality=54)
    assert reader(proc, sysfs).wifi() == 77  # 54 of 70
    proc, sysfs = fake_vitals_roots(tmp_path / "off", wifi_quality=0)  # a radio with no association: unknown
    assert reader(proc, sysfs).wifi() is None


def test_cpu_combines_time_used_since_the_last_read_with_the_load_average(tmp_path):
    proc, sysfs = fake_vitals_roots(tmp_path, load1=0.5)
    r = reader(proc, sysfs)  # one core; the reader keeps this first /proc/stat as its baseline
    # 100 more busy jiffies and 100 more idle ones: 50 % busy; load 0.5 on one core: 50 %.
    (proc / "stat").write_text("cpu  200 0 100 900 0 0 0 0 0 0\ncpu0 200 0 100 900 0 0 0 0 0 0\n")
    assert r.cpu() == 50
    # Nothing moved since: busy time is unknown, the load alone counts (capped at 100 % per core).
    (proc / "loadavg").write_text("3.00 1.00 1.00 1/100 1\n")
    assert r.cpu() == 100


def test_the_real_readers_run_here():
    own = VitalsReader()  # the /proc and sysfs parsers against this box's real trees
    vitals = own.read()
    assert vitals.cpu is not None and 0 <= vitals.cpu <= 100  # the load average at least is known
    assert vitals.bat is None or 0 <= vitals.bat <= 100
    assert vitals.power in ("battery", "mains", "")
    assert vitals.link is None or 0 <= vitals.link <= 100


def test_meaningful_changes_only():
    base = Vitals(cpu=20, bat=60, power="battery", link=80)
    assert not base.differs_from(Vitals(cpu=30, bat=57, power="battery", link=75))
    assert base.differs_from(Vitals(cpu=40, bat=60, power="battery", link=80))  # cpu +20
    assert base.differs_from(Vitals(cpu=20, bat=54, power="battery", link=80))  # battery -6
    assert base.differs_from(Vitals(cpu=20, bat=60, power="mains", link=80))  # plugged in
    assert base.differs_from(Vitals(cpu=20, bat=60, power="battery", link=None))  # link became unknown
    low = Vitals(bat=22, power="battery")
    assert low.differs_from(Vitals(bat=19, power="battery"))  # crossing the low-battery line always counts


def test_vitals_from_a_peers_txt_are_clamped_and_garbage_is_unknown():
    assert Vitals.from_txt({"cpu": "250", "bat": "-4", "pwr": "battery", "link": "55.6"}) == Vitals(
        cpu=100, bat=0, power="battery", link=56
    )
    assert Vitals.from_txt({"cpu": "nan", "bat": "x", "pwr": "nuclear"}) == Vitals()
    assert Vitals.from_txt(Vitals(cpu=3, bat=None, power="mains", link=70).txt()) == Vitals(3, None, "mains", 70)
