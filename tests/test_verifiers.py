"""Verifiers: the extraction task's JSON Schema check and reward variants; the SQL task's generator, its read-only,
time-limited sandbox and the result-set comparison (no model needed)."""

import json
import random
import time
from contextlib import closing

import pytest

from ember.errors import TaskError
from ember.tasks.extraction import REWARDS, SCHEMA, make_extraction, schema_errors, verify
from ember.tasks.sql import TEMPLATES, SqlItem, extract_sql, make_sql, run_query, sql_database, verify_sql

ANSWER = {"name": "Alice", "age": 42, "city": "Oslo", "member": True}
ITEM = make_extraction(seed=5)
DB = sql_database(0)


@pytest.mark.parametrize("value, errors", [
    (ANSWER, []),
    (dict(ANSWER, age="42"), ["$.age: '42' is not of type 'integer'"]),
    (dict(ANSWER, age=True), ["$.age: True is not of type 'integer'"]),
    (dict(ANSWER, member=1), ["$.member: 1 is not of type 'boolean'"]),
    (dict(ANSWER, extra=1), ["$: Additional properties are not allowed ('extra' was unexpected)"]),
    ({"name": "Alice", "age": 42, "member": True}, ["$: 'city' is a required property"]),
    ({"age": "x", "city": "Oslo"}, ["$.age: 'x' is not of type 'integer'", "$: 'member' is a required property",
                                    "$: 'name' is a required property"]),
    (dict(ANSWER, age=42.0), []),  # JSON Schema: 42.0 is an integer (field matching is type-exact, see below)
])
def test_schema_errors_name_each_violation(value, errors):
    assert schema_errors(value, SCHEMA) == errors


def test_schema_errors_use_the_whole_json_schema_language():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                               "score": {"type": "number", "minimum": 0}}}
    assert schema_errors({"tags": ["a", 1], "score": -1}, schema) == [
        "$.score: -1 is less than the minimum of 0", "$.tags[1]: 1 is not of type 'string'"]
    assert schema_errors([ANSWER], SCHEMA)[0].endswith("is not of type 'object'")
    with pytest.raises(TaskError, match="valid JSON Schema"):
        schema_errors({}, {"type": "no-such-type"})


@pytest.mark.parametrize("output, field_rewards, rewards", [
    (json.dumps(ITEM.answer), dict.fromkeys(ITEM.answer, 1.0), (1.0, 1.0, 1.0)),
    (json.dumps(dict(ITEM.answer, age=str(ITEM.answer["age"]))), dict.fromkeys(ITEM.answer, 1.0) | {"age": 0.0},
     (0.0, 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, age=float(ITEM.answer["age"]))), dict.fromkeys(ITEM.answer, 1.0) | {"age": 0.0},
     (0.0, 0.25 + 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, city="Atlantis")), dict.fromkeys(ITEM.answer, 1.0) | {"city": 0.0},
     (0.0, 0.25 + 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, extra=1)), dict.fromkeys(ITEM.answer, 1.0), (0.0, 0.75, 1.0)),
    ("no json here", dict.fromkeys(ITEM.answer, 0.0), (0.0, 0.0, 0.0)),
])
def test_reward_variants_on_crafted_outputs(output, field_rewards, rewards):
    assert REWARDS == ("binary", "weighted", "fields")
    results = [verify(ITEM, output, reward=name) for name in REWARDS]
    assert all(r["field_rewards"] == field_rewards for r in results)
    assert tuple(r["reward"] for r in results) == rewards


def test_weighted_reward_is_the_old_formula_and_the_default():
    """Random mutations with known effects: weighted = 0.25 x schema_valid + 0.75 x field_match exactly."""
    rng = random.Random(0)
    other_value = {"name": lambda v: v + "x", "age": lambda v: v + 1, "city": str.lower, "member": lambda v: not v}
    other_type = {"name": lambda v: 7, "age": str, "city": lambda v: None, "member": int}
    for seed in range(200):
        item = make_extraction(seed)
        value, valid, matches = {}, True, 0
        for key, gold in item.answer.items():
            change = rng.choice(("keep", "value", "type", "drop"))
            if change == "keep":
                value[key], matches = gold, matches + 1
            elif change == "value":
                value[key] = other_value[key](gold)
            elif change == "type":
                value[key], valid = other_type[key](gold), False
            else:
                valid = False
        if rng.random() < 0.2:
            value["extra"], valid = 1, False
        output = json.dumps(value)
        result = verify(item, output)
        assert result["schema_valid"] is valid and result["field_match"] == matches / 4
        assert result["reward"] == verify(item, output, "weighted")["reward"] == 0.25 * valid + 0.75 * matches / 4
        assert verify(item, output, "binary")["reward"] == float(valid and matches == 4)
        assert verify(item, output, "fields")["reward"] == matches / 4


def test_unknown_reward_variant_names_the_valid_ones():
    with pytest.raises(TaskError, match="expected one of binary, weighted, fields, found 'partial'"):
        verify(ITEM, json.dumps(ITEM.answer), reward="partial")


def fenced(sql: str) -> str:
    return f"Here is the query:\n```sql\n{sql}\n```"


def test_database_and_items_are_seeded():
    assert sql_database(3) == sql_database(3) and sql_database(3).script != sql_database(4).script
    assert make_sql(7, DB) == make_sql(7, DB) and len({make_sql(s, DB).gold_sql for s in range(30)}) > 15
    assert DB.schema_text().count("CREATE TABLE") == 3 and "INSERT" not in DB.schema_text()
    with closing(DB.connect()) as conn:
        sizes = [run_query(conn, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("departments", "employees", "projects")]
        assert sizes == [5, 60, 12]
        spread = run_query(conn, "SELECT COUNT(DISTINCT department_id), COUNT(DISTINCT salary) FROM employees")
        assert spread == [(5, 60)]


def test_items_of_one_database_share_the_prompt_prefix():
    a, b = make_sql(1, DB), make_sql(2, DB)
    assert a.messages()[0] == b.messages()[0] and a.messages()[0]["role"] == "system"
    assert DB.schema_text() in a.messages()[0]["content"]
    assert a.messages()[1] == {"role": "user", "content": a.question}


def test_every_template_verifies_its_gold_answer():
    kinds = set()
    for seed in range(120):
        item = make_sql(seed, sql_database(seed % 4))
        with closing(item.database.connect()) as conn:
            rows = run_query(conn, item.gold_sql)
        assert rows and rows != [(None,)], item.gold_sql
        assert verify_sql(item, fenced(item.gold_sql + ";")) == {
            "valid_sql": True, "executed": True, "match": True, "error": None, "reward": 1.0}
        kinds.add(next(i for i, (_, sql, _) in enumerate(TEMPLATES) if item.gold_sql.startswith(sql.split("{")[0])))
    assert kinds == set(range(len(TEMPLATES)))


@pytest.mark.parametrize("text, sql", [
    ("```sql\nSELECT 1;\n```", "SELECT 1"), ("```SQL\nselect 1\n```", "select 1"), ("```\nSELECT 2\n```", "SELECT 2"),
    ("Sure.\nSELECT name FROM employees;", "SELECT name FROM employees"),
    ("with x as (select 1) select * from x", "with x as (select 1) select * from x"),
    ("```sql\nSELECT 'a;b' FROM t;\n```", "SELECT 'a;b' FROM t"),
    ("```sql\nSELECT 1; SELECT 2\n```", None), ("SELECT 1; DROP TABLE employees", None),
    ("I would start with the employees table.", None), ("```sql\n```", None), ("", None),
])
def test_extract_sql(text, sql):
    assert extract_sql(text) == sql


@pytest.mark.parametrize("gold, predicted, reward", [
    ("SELECT COUNT(*) FROM employees WHERE age > 40", "SELECT COUNT(id) FROM employees WHERE NOT age <= 40", 1.0),
    ("SELECT name FROM employees WHERE age >= 40", "SELECT name FROM employees WHERE 40 <= age ORDER BY name", 1.0),
    ("SELECT name FROM employees WHERE age >= 40", "SELECT name FROM employees WHERE age < 40", 0.0),
    ("SELECT city FROM employees", "SELECT DISTINCT city FROM employees", 0.0),  # multisets: duplicates count
    ("SELECT name FROM employees WHERE age >= 40", "SELECT name, age FROM employees WHERE age >= 40", 0.0),
    ("SELECT AVG(salary) FROM employees", "SELECT SUM(salary) * 1.0 / COUNT(*) + 1e-9 FROM employees", 1.0),
    ("SELECT AVG(salary) FROM employees", "SELECT AVG(salary) + 0.01 FROM employees", 0.0),
    ("SELECT name FROM employees ORDER BY salary DESC LIMIT 3", "SELECT name FROM employees ORDER BY -salary LIMIT 3",
     1.0),
    ("SELECT name FROM employees ORDER BY salary DESC LIMIT 3",  # the same three rows, in the wrong order
     "SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 3) ORDER BY salary", 0.0),
])
def test_result_sets_are_compared(gold, predicted, reward):
    result = verify_sql(SqlItem("q", gold, DB), fenced(predicted))
    assert result["executed"] and result["error"] is None and result["reward"] == reward


@pytest.mark.parametrize("sql", [
    "DROP TABLE employees", "INSERT INTO employees VALUES (99, 'X', 30, 1, 'Oslo', 1)", "UPDATE employees SET age = 0",
    "DELETE FROM employees", "CREATE TABLE t (a)", "PRAGMA query_only = OFF", "BEGIN",
    "WITH x AS (SELECT 1) DELETE FROM employees WHERE id IN (SELECT * FROM x)",
])
def test_writes_ddl_and_pragmas_are_denied(sql):
    item = make_sql(0, DB)
    result = verify_sql(item, fenced(sql))
    assert result["reward"] == 0.0 and not result["valid_sql"] and "not authorized" in result["error"]
    assert verify_sql(item, fenced(item.gold_sql))["reward"] == 1.0


def test_attach_and_vacuum_create_no_file(tmp_path):
    for sql in (f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x", f"VACUUM INTO '{tmp_path / 'y.db'}'"):
        result = verify_sql(make_sql(0, DB), fenced(sql))
        assert result["reward"] == 0.0 and not result["executed"] and "authoriz" in result["error"]
    assert list(tmp_path.iterdir()) == []


def test_the_connection_stays_read_only():
    with closing(DB.connect()) as conn:
        before = run_query(conn, "SELECT * FROM employees")
        for sql in ("PRAGMA query_only = OFF", "DELETE FROM employees", "DROP TABLE employees"):
            with pytest.raises(TaskError, match="not authorized"):
                run_query(conn, sql)
        conn.set_authorizer(None)  # the second guard on its own: PRAGMA query_only
        with pytest.raises(TaskError, match="readonly database"):
            run_query(conn, "DELETE FROM employees")
        assert run_query(conn, "SELECT * FROM employees") == before


def test_runaway_queries_score_zero_quickly():
    item = make_sql(0, DB)
    forever = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT COUNT(*) FROM c"
    start = time.monotonic()
    result = verify_sql(item, fenced(forever), timeout_s=0.2)
    assert time.monotonic() - start < 0.4
    assert result["valid_sql"] and not result["executed"] and "within 0.2 s" in result["error"]
    for huge in ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT n FROM c",
                 "SELECT * FROM employees a, employees b, employees c"):
        result = verify_sql(item, fenced(huge))
        assert result["reward"] == 0.0 and "at most 10000 rows" in result["error"]


@pytest.mark.parametrize("output", [
    "", "no idea", "```sql\n```", "```sql\nSELECT 1; SELECT 2\n```", "SELECT", "```sql\nSELEC name FROM employees\n```",
    "```sql\nSELECT * FROM nowhere\n```", "```sql\nSELECT 1\x00\n```",
])
def test_malformed_output_scores_zero_with_a_reason(output):
    result = verify_sql(make_sql(0, DB), output)
    assert result["reward"] == 0.0 and not result["valid_sql"] and not result["executed"] and result["error"]
