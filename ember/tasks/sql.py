"""Synthetic text-to-SQL: a seeded SQLite database (departments, employees, projects) and questions about it; the
answer is one SELECT statement. The verifier runs the gold and the predicted query on a fresh in-memory copy,
read-only and time-limited, and rewards 1.0 when the result sets match. Nothing touches the disk."""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass

from ember.errors import TaskError
from ember.tasks.extraction import CITIES
from ember.tasks.recall import NAMES

MAX_ROWS = 10_000
DDL = """CREATE TABLE departments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    city TEXT NOT NULL,
    budget INTEGER NOT NULL
);
CREATE TABLE employees (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    age INTEGER NOT NULL,
    salary INTEGER NOT NULL,
    city TEXT NOT NULL,
    department_id INTEGER NOT NULL REFERENCES departments(id)
);
CREATE TABLE projects (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    lead_id INTEGER NOT NULL REFERENCES employees(id),
    budget INTEGER NOT NULL
);"""
DEPARTMENTS = ("Engineering", "Sales", "Marketing", "Finance", "Support", "Research", "Legal", "Operations")
SURNAMES = ("Silva", "Berg", "Mora", "Otieno", "Sato", "Dubois", "Walsh", "Ortiz", "Kask", "Costa")
PROJECTS = ("Apollo", "Borealis", "Cascade", "Delta", "Falcon", "Granite", "Harbor", "Iris", "Juniper", "Kestrel",
            "Lumen", "Meridian", "Nimbus", "Orion", "Pioneer", "Quartz", "Raven", "Solstice")
INSTRUCTIONS = ("You answer questions about a SQLite database by writing one SQLite SELECT statement. Reply with "
                "the query in a ```sql block and nothing else. The database has these tables:")
# (question, gold SQL, where the parameter comes from: a query over the data, or the values themselves)
TEMPLATES = (
    ("How many employees live in {0}?", "SELECT COUNT(*) FROM employees WHERE city = '{0}'",
     "SELECT city FROM employees"),
    ("List the names of the employees who are at least {0} years old.", "SELECT name FROM employees WHERE age >= {0}",
     "SELECT age FROM employees"),
    ("What is the average salary of the employees who live in {0}?",
     "SELECT AVG(salary) FROM employees WHERE city = '{0}'", "SELECT city FROM employees"),
    ("Which departments have at least {0} employees? Return the department names.",
     "SELECT d.name FROM departments d JOIN employees e ON e.department_id = d.id GROUP BY d.id "
     "HAVING COUNT(*) >= {0}", "SELECT COUNT(*) FROM employees GROUP BY department_id"),
    ("List the names of the employees who work in the {0} department.",
     "SELECT e.name FROM employees e JOIN departments d ON e.department_id = d.id WHERE d.name = '{0}'",
     "SELECT name FROM departments"),
    ("Which {0} employees earn the highest salaries? Return their names, highest salary first.",
     "SELECT name FROM employees ORDER BY salary DESC LIMIT {0}", (2, 3, 4, 5)),
    ("List the titles of the projects led by an employee who lives in {0}.",
     "SELECT p.title FROM projects p JOIN employees e ON p.lead_id = e.id WHERE e.city = '{0}'",
     "SELECT e.city FROM projects p JOIN employees e ON p.lead_id = e.id"),
    ("List the names of the employees who live in {0} and earn more than the average salary of all employees.",
     "SELECT name FROM employees WHERE city = '{0}' AND salary > (SELECT AVG(salary) FROM employees)",
     "SELECT city FROM employees WHERE salary > (SELECT AVG(salary) FROM employees)"),
)
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_FENCE = re.compile(r"```(?:sqlite|sql)?\s*(.*?)```", re.S | re.I)
_BARE = re.compile(r"^[ \t]*((?:SELECT|WITH)\b.*)", re.S | re.I | re.M)


@dataclass(frozen=True)
class SqlDatabase:
    """A database as SQL text: the CREATE TABLE statements and the INSERTs of its rows."""

    ddl: str
    inserts: str

    @property
    def script(self) -> str:
        """The whole script that builds the database."""
        return f"{self.ddl}\n{self.inserts}"

    def schema_text(self) -> str:
        """The CREATE TABLE statements, for the prompt."""
        return self.ddl

    def connect(self) -> sqlite3.Connection:
        """A fresh in-memory copy of the database, read-only from here on: PRAGMA query_only, and an authorizer
        that denies everything but reading (no writes, DDL, PRAGMA, ATTACH or transactions)."""
        conn = sqlite3.connect(":memory:")
        conn.executescript(self.script)
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_read_only)
        return conn


def _read_only(action: int, *_) -> int:
    """Authorizer: allow reading tables, calling functions and recursive CTEs; deny every other action."""
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def sql_database(seed: int = 0) -> SqlDatabase:
    """A seeded database: 5 departments (each with at least one employee), 60 employees with distinct names and
    salaries, and 12 projects led by employees."""
    rng = random.Random(seed)
    departments = [(i, name, rng.choice(CITIES), rng.randrange(100, 1000) * 1000)
                   for i, name in enumerate(rng.sample(DEPARTMENTS, 5), 1)]
    names = rng.sample([f"{first} {last}" for first in NAMES for last in SURNAMES], 60)
    salaries = rng.sample(range(30_000, 150_001, 250), len(names))
    people = [(i, name, rng.randrange(21, 66), salary, rng.choice(CITIES), i if i <= 5 else rng.randrange(1, 6))
              for i, (name, salary) in enumerate(zip(names, salaries), 1)]
    work = [(i, title, rng.randrange(1, len(people) + 1), rng.randrange(10, 500) * 1000)
            for i, title in enumerate(rng.sample(PROJECTS, 12), 1)]
    rows = [("departments", departments), ("employees", people), ("projects", work)]
    inserts = "\n".join(f"INSERT INTO {table} VALUES ({', '.join(map(_literal, row))});"
                        for table, table_rows in rows for row in table_rows)
    return SqlDatabase(DDL, inserts)


def _literal(value) -> str:
    return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class SqlItem:
    """One question about a database and its gold SELECT statement."""

    question: str
    gold_sql: str
    database: SqlDatabase

    @property
    def ordered(self) -> bool:
        """Whether row order is part of the answer (the gold query sorts)."""
        return re.search(r"\bORDER\s+BY\b", self.gold_sql, re.I) is not None

    def messages(self) -> list[dict]:
        """Chat messages: instructions and schema first (shared by every item of a database), the question last."""
        return [{"role": "system", "content": f"{INSTRUCTIONS}\n\n{self.database.schema_text()}"},
                {"role": "user", "content": self.question}]


def make_sql(seed: int, database: SqlDatabase) -> SqlItem:
    """A seeded question about `database`: one of TEMPLATES, its parameter drawn from the data itself so that
    the gold result is not empty."""
    rng = random.Random(seed)
    question, gold_sql, source = rng.choice(TEMPLATES)
    if not isinstance(source, tuple):
        with closing(database.connect()) as conn:
            source = sorted({row[0] for row in conn.execute(source)})
    value = rng.choice(source)
    return SqlItem(question.format(value), gold_sql.format(value), database)


def extract_sql(text: str) -> str | None:
    """The SQL statement of a model reply: the first ```sql (or bare ```) block, else the text from the first line
    starting with SELECT or WITH; None unless that is exactly one statement (a trailing semicolon is dropped)."""
    match = _FENCE.search(text) or _BARE.search(text)
    statements = _statements(match.group(1)) if match else []
    return statements[0] if len(statements) == 1 else None


def _statements(sql: str) -> list[str]:
    """The non-empty statements of `sql`, split at the semicolons that end one (not those in strings or comments)."""
    pieces, start = [], 0
    for end, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start:end + 1]):
            pieces.append(sql[start:end])
            start = end + 1
    pieces.append(sql[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def run_query(conn: sqlite3.Connection, sql: str, timeout_s: float = 1.0, max_rows: int = MAX_ROWS) -> list[tuple]:
    """The rows of `sql` on `conn`; raises TaskError naming the reason when it fails, runs past `timeout_s`
    seconds or returns more than `max_rows` rows."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        rows = conn.execute(sql).fetchmany(max_rows + 1)
    except sqlite3.Error as exc:
        if time.monotonic() > deadline:
            raise TaskError(f"query: expected to finish within {timeout_s:g} s, found it still running") from exc
        raise TaskError(f"query: expected a read-only SELECT that runs, found {type(exc).__name__}: {exc}") from exc
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise TaskError(f"query: expected at most {max_rows} rows, found more")
    return rows


def verify_sql(item: SqlItem, output: str, timeout_s: float = 1.0) -> dict:
    """valid_sql (one statement that compiles on the read-only connection), executed (it ran within `timeout_s`
    and MAX_ROWS), match (its rows equal the gold query's: as multisets, in order when the gold query sorts,
    floats rounded to 6 places), error (why not, or None) and reward (1.0 on a match, else 0.0). Both queries
    run on one fresh in-memory copy of the database; model output never raises."""
    result = {"valid_sql": False, "executed": False, "match": False, "error": None, "reward": 0.0}
    sql = extract_sql(output)
    if sql is None:
        return dict(result, error="expected exactly one SQL statement (a ```sql block or a bare SELECT/WITH), "
                                      "found none or several")
    with closing(item.database.connect()) as conn:
        gold = run_query(conn, item.gold_sql, timeout_s)
        try:
            conn.execute(f"EXPLAIN {sql}")
        except sqlite3.Error as exc:
            return dict(result, error=f"sql: expected a read-only statement that compiles, found "
                                      f"{type(exc).__name__}: {exc}")
        try:
            rows = run_query(conn, sql, timeout_s)
        except TaskError as exc:
            return dict(result, valid_sql=True, error=str(exc))
    rows, gold = _rounded(rows), _rounded(gold)
    match = rows == gold if item.ordered else Counter(rows) == Counter(gold)
    return dict(result, valid_sql=True, executed=True, match=match, reward=float(match))


def _rounded(rows: list[tuple]) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]
