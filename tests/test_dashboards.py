"""The dashboards in dashboards/: structure, names checked against the point schema, and every Grafana
query run against a real InfluxDB 1.6.7 filled by the real daemon on the simulator.

The InfluxDB 2.x template's Flux cannot run here (1.6.7 has no Flux), so it gets the structural checks
`influx apply` makes (pkger's validation: kinds, names, sizes, axes, colours), the same static check
of every measurement, field, tag and variable it names, and every query is parsed by InfluxData's own Flux
parser (npm @influxdata/flux, installed into tests/flux by scripts/install-test-tools.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import simulated_config
from schema import ELECTRICITY, FIELD_TYPES, SYSTEM
from servers import require

ROOT = Path(__file__).resolve().parent.parent
INFLUX2_PATH = ROOT / "dashboards" / "influxdb2-solarpowerbrampton.json"
GRAFANA_PATH = ROOT / "dashboards" / "grafana-influxdb1.json"

TAGS = {"site", "channel", "unit"}  # what the daemon tags (channel `tags` are the user's own; the dashboards use none)
ALL_FIELDS = set().union(*FIELD_TYPES.values())
# Fields the dashboards must show (the panels the README promises).
SHOWN_FIELDS = {"power_w", "bus_voltage_v", "energy_in_wh", "energy_out_wh",
                "cpu_temp_c", "outbox_depth", "dropped_points", "quarantined_points"}

API_VERSION = "influxdata.com/v2alpha1"
FLUX_INTERNAL = {"_measurement", "_field", "_value", "_time", "_start", "_stop"}
FLUX_VARIABLES = {"bucket", "site"}  # defined by the template's Variable resources
FLUX_BUILTIN_VARIABLES = {"timeRangeStart", "timeRangeStop", "windowPeriod"}
CHART_KINDS = {"xy", "single_stat", "gauge", "table"}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

GRAFANA_BUILTINS = {"timeFilter", "__interval", "tag_channel", "tag_unit", "col"}


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# static checkers (also tested below on queries that must fail)

def _quoted_list_items(query: str, key_pattern: str) -> list[str]:
    items = []
    for body in re.findall(key_pattern + r"\s*:\s*\[([^\]]*)\]", query):
        items += re.findall(r'"([^"]*)"', body)
    return items


def flux_problems(query: str, *, data_query: bool = True) -> list[str]:
    """What a Flux query names that the daemon does not write (empty list: all good)."""
    problems = []
    measurements = set(re.findall(r'r\._measurement\s*[!=]=\s*"([^"]*)"', query))
    measurements |= set(re.findall(r'r\["_measurement"\]\s*[!=]=\s*"([^"]*)"', query))
    fields = set(re.findall(r'r\._field\s*[!=]=\s*"([^"]*)"', query))
    fields |= set(re.findall(r'r\["_field"\]\s*[!=]=\s*"([^"]*)"', query))
    columns = set(re.findall(r"\br\.([A-Za-z]\w*)", query)) | set(re.findall(r'\br\["([A-Za-z][^"]*)"\]', query))
    listed = set(_quoted_list_items(query, r"\b(?:columns|rowKey|columnKey)"))
    tag_args = set(re.findall(r'\btag\s*:\s*"([^"]*)"', query))
    variables = set(re.findall(r"\bv\.(\w+)", query))

    for m in sorted(measurements - set(FIELD_TYPES)):
        problems.append(f"unknown measurement {m!r}")
    allowed_fields = set().union(*(FIELD_TYPES.get(m, {}) for m in measurements)) if measurements else set()
    for f in sorted(fields - allowed_fields):
        problems.append(f"field {f!r} is not written to {sorted(measurements)}")
    if data_query:
        if len(measurements) != 1:
            problems.append(f"expected exactly one measurement, got {sorted(measurements)}")
        if not fields:
            problems.append("no r._field filter")
        if "from(bucket: v.bucket)" not in query:
            problems.append("does not read from(bucket: v.bucket)")
        if not re.search(r"\br\.site\s*==\s*v\.site\b", query):
            problems.append("does not filter r.site == v.site")
    # r.X after a pivot may be a field of this query; anything else must be a tag
    for c in sorted(columns - TAGS - fields):
        problems.append(f"column r.{c} is neither a tag the daemon writes nor a field of this query")
    for c in sorted(listed - TAGS - FLUX_INTERNAL):
        problems.append(f"column {c!r} in a column list is not a tag the daemon writes")
    for t in sorted(tag_args - TAGS):
        problems.append(f"tag {t!r} is not written by the daemon")
    for v in sorted(variables - FLUX_VARIABLES - FLUX_BUILTIN_VARIABLES):
        problems.append(f"unknown dashboard variable v.{v}")
    return problems


_GROUP_BY = re.compile(r"\bGROUP BY\b(.*?)(?=\bfill\(|\bLIMIT\b|\bORDER\b|\)|$)", re.IGNORECASE | re.DOTALL)


def influxql_problems(query: str) -> list[str]:
    """Every double-quoted identifier of an InfluxQL query is classified by where it stands (measurement,
    tag, alias or field) and checked against the schema; unquoted function arguments are refused so that
    nothing escapes the check."""
    problems = []
    blanked = re.sub(r"\btime\([^)]*\)", lambda m: " " * len(m.group()), query)  # GROUP BY time(...), "tag"
    group_spans = [m.span(1) for m in _GROUP_BY.finditer(blanked)]
    measurements, tags, aliases, fields = set(), set(), set(), set()
    for m in re.finditer(r'"([^"]*)"', query):
        name, before, after = m.group(1), query[:m.start()], query[m.end():]
        if re.search(r"\bAS\s*$", before, re.IGNORECASE):
            aliases.add(name)
        elif re.search(r"\bFROM\s*$", before, re.IGNORECASE):
            measurements.add(name)
        elif re.search(r"\bKEY\s*=\s*$", before, re.IGNORECASE):
            tags.add(name)
        elif re.match(r"\s*(=~|!~|!=|<>|=)", after):
            tags.add(name)
        elif any(a <= m.start() < b for a, b in group_spans):
            tags.add(name)
        else:
            fields.add(name)
    for m in re.finditer(r"\bFROM\s+(?![\"(])(\S+)", query, re.IGNORECASE):
        problems.append(f"unquoted measurement {m.group(1)!r}")
    for m in re.finditer(r"\b(\w+)\((?![\"*)])", query):
        if m.group(1).lower() not in {"time", "fill", "tz"}:
            problems.append(f"{m.group(1)}() with an unquoted argument")
    if not measurements:
        problems.append("no FROM \"measurement\"")
    for name in sorted(measurements - set(FIELD_TYPES)):
        problems.append(f"unknown measurement {name!r}")
    allowed = set().union(*(FIELD_TYPES.get(name, {}) for name in measurements)) if measurements else set()
    for name in sorted(fields - allowed - aliases):
        problems.append(f"field {name!r} is not written to {sorted(measurements)}")
    for name in sorted(tags - TAGS):
        problems.append(f"tag {name!r} is not written by the daemon")
    return problems


# ----------------------------------------------------------------------------------------------------------
# the InfluxDB 2.x template

def influx2_resources():
    return load(INFLUX2_PATH)


def influx2_dashboard():
    (dash,) = [r for r in influx2_resources() if r["kind"] == "Dashboard"]
    return dash


def influx2_charts():
    return influx2_dashboard()["spec"]["charts"]


def test_influx2_template_is_a_list_of_v2alpha1_resources():
    resources = influx2_resources()
    assert isinstance(resources, list) and resources
    names = [r["metadata"]["name"] for r in resources]
    assert len(set(names)) == len(names)
    for r in resources:
        assert r["apiVersion"] == API_VERSION
        assert r["kind"] in {"Dashboard", "Variable"}
        assert DNS1123.match(r["metadata"]["name"]) and len(r["metadata"]["name"]) <= 63
        assert len(r["spec"]["name"]) >= 2
    assert [r["kind"] for r in resources].count("Dashboard") == 1


def test_influx2_variables_bucket_and_site_are_flux_queries():
    variables = {r["spec"]["name"]: r["spec"] for r in influx2_resources() if r["kind"] == "Variable"}
    assert set(variables) == FLUX_VARIABLES
    for spec in variables.values():
        assert spec["type"] == "query" and spec["language"] == "flux" and spec["query"].strip()
        assert spec["selected"]
    assert variables["bucket"]["query"].startswith("buckets()")
    assert variables["bucket"]["selected"] == ["solar"]  # the README's bucket
    assert flux_problems(variables["site"]["query"], data_query=False) == []
    assert 'tag: "site"' in variables["site"]["query"]
    # the bucket list query only uses the `name` column of buckets()
    assert set(re.findall(r"\br\.(\w+)", variables["bucket"]["query"])) == {"name"}


@pytest.mark.parametrize("chart", influx2_charts(), ids=lambda c: c["name"])
def test_influx2_chart_is_valid_for_influx_apply(chart):
    kind = chart["kind"].strip().lower()
    assert kind in CHART_KINDS
    assert chart["name"].strip()
    assert chart["width"] > 0 and chart["height"] > 0
    assert 0 <= chart["xPos"] and chart["xPos"] + chart["width"] <= 12 and chart["yPos"] >= 0
    assert chart["queries"] and all(q["query"].strip() for q in chart["queries"])
    assert all(c.get("hex") for c in chart.get("colors", []))
    assert chart.get("note"), "every chart explains itself"
    if kind == "xy":
        assert {a["name"] for a in chart["axes"]} >= {"x", "y"}
        assert chart["geom"] in {"line", "step", "stacked", "monotoneX", "bar"}
        assert chart.get("position", "").lower() in {"", "overlaid", "stacked"}
    if kind == "gauge":
        assert {c["type"] for c in chart["colors"]} >= {"min", "max"}
    if kind == "table":
        assert chart.get("tableOptions", {}).get("wrapping", "") in {"", "single-line", "truncate", "wrap"}


def test_influx2_charts_do_not_overlap():
    cells = {}
    for chart in influx2_charts():
        for x in range(chart["xPos"], chart["xPos"] + chart["width"]):
            for y in range(chart["yPos"], chart["yPos"] + chart["height"]):
                assert (x, y) not in cells, f"{chart['name']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = chart["name"]


@pytest.mark.parametrize("chart", influx2_charts(), ids=lambda c: c["name"])
def test_influx2_queries_name_only_what_the_daemon_writes(chart):
    for q in chart["queries"]:
        assert flux_problems(q["query"]) == []


def test_influx2_panels_cover_the_brief():
    charts = influx2_charts()
    queries = [q["query"] for c in charts for q in c["queries"]]
    shown = {f for q in queries for f in re.findall(r'r\._field\s*==\s*"([^"]*)"', q)}
    assert SHOWN_FIELDS <= shown
    kinds = {c["kind"].lower() for c in charts}
    assert kinds == CHART_KINDS
    # energy today: counters from midnight on; time since the last point: now - last _time
    assert any("date.truncate(t: now(), unit: 1d)" in q and "energy_in_wh" in q for q in queries)
    assert any("last()" in q and "int(v: now()) - int(v: r._time)" in q for q in queries)
    # flows: signed power_w per unit, with the sign explained
    flows = [c for c in charts if "flow" in c["name"].lower()]
    assert flows and '"power_w"' in flows[0]["queries"][0]["query"] and "+ = into the unit" in flows[0]["note"]
    # daily energy per unit: each counter's steps summed per day of the model's time zone (as the Grafana panel)
    (daily,) = [c["queries"][0]["query"] for c in charts if c["name"].startswith("Daily energy per unit")]
    for part in ('option location = timezone.location(name: "Europe/London")', "difference(nonNegative: true)",
                 "aggregateWindow(every: 1d, fn: sum", 'group(columns: ["unit", "channel", "_field"])'):
        assert part in daily


# ----------------------------------------------------------------------------------------------------------
# InfluxData's own Flux parser (tests/flux/parse.mjs runs the npm package @influxdata/flux under node)

FLUX_DIR = ROOT / "tests" / "flux"


def flux_queries() -> list[tuple[str, str]]:
    """(where, query) for every Flux query of the template: every chart's and every variable's."""
    found = [(f"chart {c['name']!r}", q["query"]) for c in influx2_charts() for q in c["queries"]]
    found += [(f"variable {r['spec']['name']!r}", r["spec"]["query"]) for r in influx2_resources()
              if r["kind"] == "Variable" and r["spec"].get("language") == "flux"]
    return found


@pytest.fixture(scope="module")
def flux_parse():
    """parse(queries) -> one list of syntax errors per query, from InfluxData's parser (one node process)."""
    node = shutil.which("node")
    reason = None
    if node is None:
        reason = "node is not installed (scripts/install-test-tools.sh installs Debian's nodejs and npm)"
    elif not (FLUX_DIR / "node_modules" / "@influxdata" / "flux" / "flux_bg.wasm").exists():
        reason = "@influxdata/flux is not installed in tests/flux (scripts/install-test-tools.sh runs npm ci there)"
    require(reason)

    def parse(queries: list[str]) -> list[list[str]]:
        result = subprocess.run([node, str(FLUX_DIR / "parse.mjs")], input=json.dumps(queries), capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        answers = json.loads(result.stdout)
        assert len(answers) == len(queries)
        return answers

    return parse


def test_every_flux_query_of_the_template_parses_with_influxdatas_parser(flux_parse):
    queries = flux_queries()
    assert len(queries) == len(influx2_charts()) + 2  # every chart and both variables
    problems = {where: errors for (where, _), errors in zip(queries, flux_parse([q for _, q in queries])) if errors}
    assert problems == {}


BROKEN_FLUX = [
    # a missing closing parenthesis
    'from(bucket: v.bucket\n  |> range(start: v.timeRangeStart, stop: v.timeRangeStop)',
    # InfluxQL's operator in Flux
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._field = "power_w")',
    # an operator without its right-hand side
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._field == "power_w" and)',
    # a pipe without a call
    'from(bucket: v.bucket) |> range(start: -1h) |> ',
]


def test_influxdatas_parser_finds_syntax_errors(flux_parse):
    """The parse check can fail: broken versions of the template's own queries are refused."""
    daily = next(q for where, q in flux_queries() if "Daily energy" in where)
    broken = BROKEN_FLUX + [daily.replace("|> difference(nonNegative: true)", "|> difference(nonNegative: true")]
    answers = flux_parse(broken + [daily])
    for query, errors in zip(broken, answers):
        assert errors, f"no syntax error found in {query!r}"
    assert answers[-1] == []


# ----------------------------------------------------------------------------------------------------------
# the Grafana dashboard

def grafana():
    return load(GRAFANA_PATH)


def grafana_panels():
    return [p for p in grafana()["panels"] if p["type"] != "row"]


def grafana_targets():
    return [(p, t) for p in grafana_panels() for t in p["targets"]]


def grafana_variables():
    return {v["name"]: v for v in grafana()["templating"]["list"]}


def target_id(item):
    panel, target = item
    return f"{panel['title']}/{target['refId']}"


def test_grafana_dashboard_model():
    d = grafana()
    assert d["schemaVersion"] >= 36
    assert d["title"] and d["uid"] and d["id"] is None
    ids = [p["id"] for p in d["panels"]]
    assert len(set(ids)) == len(ids)
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24
    assert {p["type"] for p in grafana_panels()} >= {"stat", "timeseries", "table", "gauge"}


def test_grafana_variables():
    v = grafana_variables()
    assert v["timezone"]["type"] == "custom" and v["timezone"]["current"]["value"] == "Europe/London"
    assert v["timezone"]["query"].split(",")[0] == "Europe/London"  # the model's (and the Pi's) time zone
    assert v["DS_INFLUXDB"]["type"] == "datasource" and v["DS_INFLUXDB"]["query"] == "influxdb"
    assert v["site"]["type"] == "query"
    assert v["site"]["query"] == 'SHOW TAG VALUES FROM "electricity" WITH KEY = "site"'
    assert v["channel"]["type"] == "query" and v["channel"]["multi"] and v["channel"]["includeAll"]
    assert "unit" not in v  # the sensor is the `channel` tag; `unit` names the part of the model it sits on
    for name in ("site", "channel"):
        assert v[name]["datasource"] == {"type": "influxdb", "uid": "${DS_INFLUXDB}"}
        assert influxql_problems(v[name]["query"]) == []


@pytest.mark.parametrize("item", grafana_targets(), ids=target_id)
def test_grafana_target(item):
    panel, target = item
    q = target["query"]
    assert panel["datasource"] == target["datasource"] == {"type": "influxdb", "uid": "${DS_INFLUXDB}"}
    assert target["rawQuery"] is True and target["resultFormat"] in {"time_series", "table"}
    assert influxql_problems(q) == []
    assert "$timeFilter" in q and '"site" =~ /^$site$/' in q
    if f'FROM "{ELECTRICITY}"' in q:
        assert '"channel" =~ /^$channel$/' in q
    if panel["type"] == "timeseries":  # Grafana's interval, or whole days for the daily energy panel
        assert "GROUP BY time($__interval)" in q or ("GROUP BY time(1d)" in q and "tz('$timezone')" in q)
    used = set(re.findall(r"\$(\w+)", q)) | set(re.findall(r"\$(\w+)", target.get("alias", "")))
    assert used <= set(grafana_variables()) | GRAFANA_BUILTINS


def test_grafana_panels_cover_the_brief():
    queries = [t["query"] for _, t in grafana_targets()]
    shown = {f for q in queries for f in re.findall(r'\w+\("(\w+)"\)', q)}
    assert SHOWN_FIELDS <= shown
    titles = {p["title"]: p for p in grafana_panels()}
    flows = [p for t, p in titles.items() if "flow" in t.lower()]
    assert flows and "+ = into the unit" in flows[0]["description"]
    last_point = [p for p in grafana_panels() if p["fieldConfig"]["defaults"].get("unit") == "dateTimeFromNow"]
    assert last_point and last_point[0]["options"]["reduceOptions"]["fields"] == "/^Time$/"
    (daily,) = [t["query"] for p in grafana_panels() if p["title"].startswith("Daily energy per unit")
                for t in p["targets"]]
    for part in ('non_negative_difference("energy_in_wh")', 'non_negative_difference("energy_out_wh")',
                 'GROUP BY time(1d), "unit", "channel"', "tz('$timezone')"):
        assert part in daily
    today = [p for p in grafana_panels() if p.get("timeFrom") == "now/d"]
    assert {"energy_in_wh", "power_w"} <= {f for p in today for t in p["targets"]
                                           for f in re.findall(r'\w+\("(\w+)"\)', t["query"])}


# ----------------------------------------------------------------------------------------------------------
# the checkers themselves catch wrong names

@pytest.mark.parametrize("query", [
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "electricity")'
    ' |> filter(fn: (r) => r._field == "power") |> filter(fn: (r) => r.site == v.site)',
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "power")'
    ' |> filter(fn: (r) => r._field == "power_w") |> filter(fn: (r) => r.site == v.site)',
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "system")'
    ' |> filter(fn: (r) => r._field == "power_w") |> filter(fn: (r) => r.site == v.site)',
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "electricity")'
    ' |> filter(fn: (r) => r._field == "power_w") |> filter(fn: (r) => r.site == v.site and r.role == "solar")',
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "electricity")'
    ' |> filter(fn: (r) => r._field == "power_w") |> filter(fn: (r) => r.site == v.site)'
    ' |> group(columns: ["house"])',
    'from(bucket: v.bucket) |> range(start: v.start) |> filter(fn: (r) => r._measurement == "electricity")'
    ' |> filter(fn: (r) => r._field == "power_w") |> filter(fn: (r) => r.site == v.site)',
    'from(bucket: v.bucket) |> range(start: -1h) |> filter(fn: (r) => r._measurement == "electricity")'
    ' |> filter(fn: (r) => r._field == "power_w")',
])
def test_flux_checker_rejects(query):
    assert flux_problems(query)


@pytest.mark.parametrize("query", [
    'SELECT last("power") FROM "electricity" WHERE $timeFilter',
    'SELECT last("power_w") FROM "electrics" WHERE $timeFilter',
    'SELECT last("power_w") FROM "system" WHERE $timeFilter',
    'SELECT last("power_w") FROM "electricity" WHERE "role" = \'solar\' AND $timeFilter',
    'SELECT last("power_w") FROM "electricity" WHERE $timeFilter GROUP BY "house"',
    'SELECT last(power_w) FROM "electricity" WHERE $timeFilter',
    'SELECT last("power_w") FROM electricity WHERE $timeFilter',
    'SELECT sum("x") FROM (SELECT non_negative_difference("energy_in") AS "x" FROM "electricity") GROUP BY "unit"',
    'SHOW TAG VALUES FROM "electricity" WITH KEY = "house"',
])
def test_influxql_checker_rejects(query):
    assert influxql_problems(query)


# ----------------------------------------------------------------------------------------------------------
# every Grafana query against a real InfluxDB 1.6.7 filled by the real daemon

SITE = "dashtest"
DATABASE = "dashboards"
UNITS = ("blue_house", "green_house", "power_plant", "red_house")  # the simulator's default channels
UNIT_CHOICES = {
    "all": "(" + "|".join(UNITS) + ")",  # how Grafana renders a multi-value variable inside /^...$/
    "one": "power_plant",
}


# A second site in the same database, with channels of its own names, measured after SITE: every query
# for one site must show that site's data and not the other's.
OTHER = "neighbour"
OTHER_CHANNELS = ("annex_plant", "annex_red")
OTHER_CHANNELS_TOML = """
[[channel]]
name = "annex_red"
unit = "red_house"
address = 0x40
role = "solar"

[[channel]]
name = "annex_plant"
unit = "power_plant"
address = 0x45
max_current_a = 3.2
role = "solar"
"""


def daemon_config(influxdb1, tmp: Path, site: str, *, database: str = DATABASE, channels_toml: str = "",
                  simulation: str = "speed = 600\nstart = 2025-06-21T12:00:00") -> Path:
    """A config for the real daemon on the simulator's day (by default a pinned June noon, so the panels give
    energy whatever the hour the suite runs), writing to `database` of InfluxDB 1.6.7 as `site`."""
    influx = (f'[influx]\nkind = "local"\napi = "v1"\nurl = "{influxdb1.url}"\ndatabase = "{database}"\n'
              "flush_interval_s = 0.3\ntimeout_s = 5\n")
    return simulated_config(tmp / f"{site}.toml", site, tmp / site, interval_s=0.2,
                            simulation=f'scenario = "day"\n{simulation}', tables=influx + channels_toml)


def run_daemon(influxdb1, tmp: Path, site: str, cycles: int, channels_toml: str = "", **kwargs) -> Path:
    """The real daemon for `cycles` cycles with daemon_config(...); returns the config's path."""
    config = daemon_config(influxdb1, tmp, site, channels_toml=channels_toml, **kwargs)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config),
                             "--cycles", str(cycles)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TZ": "Europe/London"})
    assert result.returncode == 0, result.stderr[-3000:]
    return config


@pytest.fixture(scope="module")
def filled(influxdb1, tmp_path_factory):
    """Database DATABASE holding 12 cycles the daemon measured on the simulator as SITE, then 6 as OTHER;
    returns the field keys."""
    tmp = tmp_path_factory.mktemp("dashboards")
    influxdb1.create_database(DATABASE)
    run_daemon(influxdb1, tmp, SITE, 12)
    run_daemon(influxdb1, tmp, OTHER, 6, OTHER_CHANNELS_TOML)
    keys = {}
    for series in influxdb1.query(DATABASE, "SHOW FIELD KEYS"):
        keys[series["name"]] = {row[0] for row in series["values"]}
    assert set(keys) == {ELECTRICITY, SYSTEM}, keys
    return keys


def substitute(query: str, unit_regex: str, site: str = SITE, timezone: str = "Europe/London") -> str:
    """What Grafana sends for the query (datasource ignored; a 1 h range and a 1 s interval)."""
    return (query.replace("$timeFilter", "time > now() - 1h")
                 .replace("$__interval", "1s")
                 .replace("$site", site)
                 .replace("$channel", unit_regex)
                 .replace("$timezone", timezone))


def queried_fields(query: str) -> set[str]:
    return set(re.findall(r'\w+\("(\w+)"\)', query)) & ALL_FIELDS


def non_null_values(series: list[dict]) -> list:
    return [v for s in series for row in s["values"] for v in row[1:] if v is not None]


@pytest.mark.parametrize("unit", UNIT_CHOICES)
@pytest.mark.parametrize("item", grafana_targets(), ids=target_id)
def test_grafana_query_returns_data_from_the_daemon(influxdb1, filled, item, unit):
    panel, target = item
    query = substitute(target["query"], UNIT_CHOICES[unit])
    series = influxdb1.query(DATABASE, query)  # raises ServerError if InfluxDB 1.6.7 refuses the statement
    written = set().union(*filled.values())
    if not queried_fields(query) & written:
        # Only cpu_temp_c can be missing: the daemon leaves it out where the machine has no sensor.
        assert queried_fields(query) == {"cpu_temp_c"} and series == [], query
        return
    assert series, f"no series for {query}"
    assert non_null_values(series), f"only nulls for {query}"
    grouped_units = {s.get("tags", {}).get("channel") for s in series} - {None}
    if 'GROUP BY "channel"' in query or ', "channel"' in query:
        expected = set(UNITS) if unit == "all" else {"power_plant"}
        assert grouped_units == expected, query


def test_grafana_energy_today_is_in_minus_out(influxdb1, filled):
    (target,) = [t for p, t in grafana_targets() if p["title"] == "Energy today (Wh)"]
    series = influxdb1.query(DATABASE, substitute(target["query"], UNIT_CHOICES["all"]))
    assert {s["tags"]["channel"] for s in series} == set(UNITS)
    for s in series:
        row = dict(zip(s["columns"], s["values"][0]))
        assert row["in_wh"] >= 0 and row["out_wh"] >= 0
        assert row["net_wh"] == pytest.approx(row["in_wh"] - row["out_wh"])
    assert any(dict(zip(s["columns"], s["values"][0]))["in_wh"] > 0 for s in series)


def test_grafana_last_point_is_recent(influxdb1, filled):
    (panel,) = [p for p in grafana_panels() if p["fieldConfig"]["defaults"].get("unit") == "dateTimeFromNow"]
    series = influxdb1.query(DATABASE, substitute(panel["targets"][0]["query"], UNIT_CHOICES["all"]))
    newest_ms = series[0]["values"][0][0]
    assert 0 <= time.time() - newest_ms / 1000 < 120


@pytest.mark.parametrize("name", ["site", "channel"])
def test_grafana_variable_queries_list_the_daemons_tags(influxdb1, filled, name):
    query = substitute(grafana_variables()[name]["query"], UNIT_CHOICES["all"])
    values = {row[1] for s in influxdb1.query(DATABASE, query) for row in s["values"]}
    assert values == ({SITE, OTHER} if name == "site" else set(UNITS))
    if name == "channel":
        query = substitute(grafana_variables()[name]["query"], UNIT_CHOICES["all"], site=OTHER)
        assert {row[1] for s in influxdb1.query(DATABASE, query) for row in s["values"]} == set(OTHER_CHANNELS)


BOTH_SITES_CHANNELS = "(" + "|".join(UNITS + OTHER_CHANNELS) + ")"


@pytest.mark.parametrize("item", grafana_targets(), ids=target_id)
def test_grafana_query_shows_the_selected_site_and_not_the_other(influxdb1, filled, item):
    """With every channel of both sites selected, only the site variable tells them apart."""
    panel, target = item
    results = {site: influxdb1.query(DATABASE, substitute(target["query"], BOTH_SITES_CHANNELS, site=site))
               for site in (SITE, OTHER, "nosuchsite")}
    assert results["nosuchsite"] == []
    if queried_fields(target["query"]) == {"cpu_temp_c"} and results[SITE] == []:
        return  # no temperature sensor on this machine (see test_grafana_query_returns_data_from_the_daemon)
    assert results[SITE] and results[OTHER]
    # The sites were measured one after the other: without the site filter both answers would be the same.
    assert results[SITE] != results[OTHER], target["query"]
    if 'GROUP BY "channel"' in target["query"] or ', "channel"' in target["query"]:
        for site, channels in ((SITE, set(UNITS)), (OTHER, set(OTHER_CHANNELS))):
            assert {s["tags"]["channel"] for s in results[site]} == channels, (site, target["query"])


def daily_panel():
    (panel,) = [p for p in grafana_panels() if p["title"].startswith("Daily energy per unit")]
    return panel


def test_grafana_daily_energy_is_each_counters_increase_per_local_day(influxdb1, filled):
    """The daily panel adds up the steps of energy_in_wh / energy_out_wh per unit and channel per day of the
    time zone variable: summed over the days, exactly each counter's increase over the points (what the logger
    integrated between those readings). Holds at any hour, a midnight between the cycles included."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    (target,) = daily_panel()["targets"]
    series = influxdb1.query(DATABASE, substitute(target["query"], BOTH_SITES_CHANNELS))
    by_channel = {(s["tags"]["unit"], s["tags"]["channel"]): s for s in series}
    assert set(by_channel) == {(u, u) for u in UNITS}  # SITE's units, each with its (default) channel
    london = ZoneInfo("Europe/London")
    for (unit, channel), s in by_channel.items():
        rows = [dict(zip(s["columns"], v)) for v in s["values"]]
        for row in rows:  # each bucket starts at a local midnight
            start = dt.datetime.fromtimestamp(row["time"] / 1000, london)
            assert (start.hour, start.minute, start.second) == (0, 0, 0), start
        for field, column in (("energy_in_wh", "in_wh"), ("energy_out_wh", "out_wh")):
            (counter,) = influxdb1.query(DATABASE, f'SELECT first("{field}"), last("{field}") FROM "electricity" '
                                                   f"WHERE \"site\" = '{SITE}' AND \"channel\" = '{channel}' "
                                                   "AND time > now() - 1h")
            _, first, last = counter["values"][0]
            assert sum(row[column] or 0 for row in rows) == pytest.approx(last - first, abs=1e-9), (channel, field)
    assert any(row[1] > 0 for s in series for row in s["values"])  # a June noon: the panels generate


@pytest.mark.parametrize("timezone, midnight_utc_ms", [("UTC", 0), ("Asia/Kolkata", (24 - 5.5) * 3_600_000)])
def test_grafana_daily_energy_days_follow_the_time_zone_variable(influxdb1, filled, timezone, midnight_utc_ms):
    # Kolkata has no summer time (+05:30 all year): its days start at 18:30 UTC whatever the season.
    (target,) = daily_panel()["targets"]
    series = influxdb1.query(DATABASE, substitute(target["query"], BOTH_SITES_CHANNELS, timezone=timezone))
    assert series and all(v[0] % 86_400_000 == midnight_utc_ms for s in series for v in s["values"])


# -- the daily panel agrees with `report` ----------------------------------------------------------------------
LEDGER_DATABASE = "ledger"
LEDGER_SITE = "ledgersite"


def test_grafana_daily_energy_equals_reports_daily_totals(influxdb1, tmp_path):
    """The real daemon on the simulator fills InfluxDB 1.6.7 with a simulated June day (points stamped with the
    simulated time, one reading every 8 simulated minutes); the daily panel's Wh per unit, for that day in
    London, equals `python main.py report`'s `generated` from the daemon's own store within 1 %.

    They are computed apart: Grafana sums the steps of the energy counters the daemon integrated as it
    measured, `report` integrates `power_w` between the stored readings by the trapezoid rule. The
    simulated day runs 03:00-23:00, so both ends are at night and the two rules meet; a cycle that runs late on
    a busy machine leaves a gap both rules leave unbridged."""
    influxdb1.create_database(LEDGER_DATABASE)
    config = run_daemon(influxdb1, tmp_path, LEDGER_SITE, 150, database=LEDGER_DATABASE,
                        simulation='speed = 2400\nstart = 2025-06-21T03:00:00\nstamp = "simulated"')
    env = {**os.environ, "TZ": "Europe/London"}
    report = subprocess.run([sys.executable, str(ROOT / "main.py"), "report", "--config", str(config),
                             "--day", "2025-06-21", "--format", "json"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    units = json.loads(report.stdout)["sites"][LEDGER_SITE]["days"]["2025-06-21"]["units"]

    (target,) = daily_panel()["targets"]
    query = (target["query"].replace("$timeFilter", "time >= '2025-06-20T23:00:00Z' AND time < '2025-06-21T23:00:00Z'")
             .replace("$site", LEDGER_SITE).replace("$channel", "(" + "|".join(UNITS) + ")")
             .replace("$timezone", "Europe/London"))
    series = influxdb1.query(LEDGER_DATABASE, query)
    grafana = {}
    for s in series:
        rows = [dict(zip(s["columns"], v)) for v in s["values"]]
        assert [dt_row["time"] for dt_row in rows] == [1750460400000], rows  # 21 June 00:00 BST, one bucket
        grafana[s["tags"]["unit"]] = rows[0]["in_wh"]
    assert set(grafana) == set(UNITS) == set(units)
    for unit in UNITS:
        generated = units[unit]["generated"]
        assert generated["coverage"] > 0.5, (unit, generated)  # 20 of 24 h at best; late cycles leave gaps
        assert generated["wh"] > 1.0, (unit, generated)  # a June day: real energy, not a rounding of zero
        assert grafana[unit] == pytest.approx(generated["wh"], rel=0.01), (unit, grafana[unit], generated)
