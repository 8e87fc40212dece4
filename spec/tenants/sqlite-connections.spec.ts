import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import {
  execSql,
  keepStatements,
  querySql,
  releaseStatements,
} from '../../tenants/sqlite-connections.ts';
import type { SqliteConnection } from '../../tenants/sqlite-connections.ts';

/** A real connection whose prepare calls are counted (the statements themselves are real). */
function counted(db: sqlite3.Database): { db: SqliteConnection; prepares: () => number } {
  let n = 0;
  const prepare = db.prepare.bind(db);
  const conn = db as unknown as SqliteConnection;
  conn.prepare = (sql: string, cb: (err: Error | null) => void) => {
    n += 1;
    return prepare(sql, cb);
  };
  return { db: conn, prepares: () => n };
}

function close(db: SqliteConnection): Promise<Error | null> {
  return new Promise((resolve) => {
    db.close((err) => {
      resolve(err);
    });
  });
}

describe('tenants/ sqlite connections: statements kept prepared', () => {
  let dir: string;
  let raw: sqlite3.Database;
  let conn: ReturnType<typeof counted>;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-stmts-'));
    raw = new sqlite3.Database(path.join(dir, 'x.sqlite'));
    conn = counted(raw);
    await execSql(conn.db, 'CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)');
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('prepares each statement once on a keeping connection', async () => {
    keepStatements(conn.db);
    for (let i = 0; i < 5; i++) {
      await querySql(conn.db, 'INSERT INTO t (v) VALUES (?)', [Buffer.from([i])]);
    }
    const rows = await querySql<{ n: number }>(
      conn.db,
      'SELECT count(*) AS n FROM t WHERE id > ?',
      [0],
    );
    expect(rows).to.deep.equal([{ n: 5 }]);
    expect(conn.prepares()).to.equal(2);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('leaves other connections as they were (a statement per call, finalized)', async () => {
    for (let i = 0; i < 3; i++) {
      await querySql(conn.db, 'INSERT INTO t (v) VALUES (?)', [Buffer.from([i])]);
    }
    expect(conn.prepares()).to.equal(0); // db.all prepares and finalizes its own each time
    expect(await close(conn.db)).to.equal(null);
  });

  it('binds fresh parameters on every reuse (BLOBs come back as Buffers)', async () => {
    keepStatements(conn.db);
    for (const bytes of [[1], [2, 3], []]) {
      await querySql(conn.db, 'INSERT INTO t (v) VALUES (?)', [Buffer.from(bytes)]);
    }
    const rows = await querySql<{ v: Buffer }>(
      conn.db,
      'SELECT v FROM t WHERE id >= ? ORDER BY id',
      [1],
    );
    expect(rows.map((r) => [...r.v])).to.deep.equal([[1], [2, 3], []]);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('rejects a statement that does not prepare, and keeps working', async () => {
    keepStatements(conn.db);
    for (let attempt = 0; attempt < 2; attempt++) {
      let err: unknown;
      try {
        await querySql(conn.db, 'SELECT nope FROM missing', []);
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(Error);
      expect((err as Error & { code?: string }).code).to.equal('SQLITE_ERROR');
    }
    await querySql(conn.db, 'INSERT INTO t (v) VALUES (?)', [Buffer.from([9])]);
    expect(await querySql(conn.db, 'SELECT count(*) AS n FROM t', [])).to.deep.equal([{ n: 1 }]);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('a constraint violation rejects that call only; the same statement works again', async () => {
    keepStatements(conn.db);
    const insert = 'INSERT INTO t (id, v) VALUES (?, ?)';
    await querySql(conn.db, insert, [1, Buffer.from([1])]);
    let err: unknown;
    try {
      await querySql(conn.db, insert, [1, Buffer.from([1])]);
    } catch (e) {
      err = e;
    }
    expect((err as Error & { code?: string }).code).to.equal('SQLITE_CONSTRAINT');
    await querySql(conn.db, insert, [2, Buffer.from([2])]);
    expect(await querySql(conn.db, 'SELECT count(*) AS n FROM t', [])).to.deep.equal([{ n: 2 }]);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('keeps at most 32 statements (least recently used are finalized); the connection closes', async () => {
    keepStatements(conn.db);
    for (let i = 0; i < 50; i++) {
      await querySql(conn.db, `SELECT ${String(i)} AS n`, []);
    }
    const before = conn.prepares();
    await querySql(conn.db, 'SELECT 49 AS n', []); // recent: kept
    await querySql(conn.db, 'SELECT 18 AS n', []); // the oldest kept one
    expect(conn.prepares()).to.equal(before);
    await querySql(conn.db, 'SELECT 0 AS n', []); // finalized long ago: prepared again
    expect(conn.prepares()).to.equal(before + 1);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('keeps at most 1,024 parameters in all; a larger statement runs without being kept', async () => {
    keepStatements(conn.db);
    const select = (n: number) =>
      `SELECT count(*) AS n FROM t WHERE id IN (${Array.from({ length: n }, () => '?').join(',')})`;
    const ids = (n: number) => Array.from({ length: n }, (_, i) => i);
    for (let round = 0; round < 2; round++) {
      expect(await querySql(conn.db, select(1025), ids(1025))).to.deep.equal([{ n: 0 }]);
    }
    expect(conn.prepares()).to.equal(0); // not kept: db.all prepares and finalizes its own
    await querySql(conn.db, select(600), ids(600));
    await querySql(conn.db, select(500), ids(500)); // 1,100 in all: the 600 one goes
    const before = conn.prepares();
    await querySql(conn.db, select(500), ids(500));
    expect(conn.prepares()).to.equal(before);
    await querySql(conn.db, select(600), ids(600));
    expect(conn.prepares()).to.equal(before + 1);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });

  it('keeps at most 131,072 parameters across all connections: the least recently used go', async () => {
    const others = Array.from({ length: 132 }, () => counted(new sqlite3.Database(':memory:')));
    const all = [conn, ...others];
    const select = `SELECT ${Array.from({ length: 1000 }, () => '?').join(' + ')} AS n`;
    const ones = Array.from({ length: 1000 }, () => 1);
    for (const c of all) {
      keepStatements(c.db);
      expect(await querySql(c.db, select, ones)).to.deep.equal([{ n: 1000 }]);
    }
    // 133 x 1,000 parameters: the first two connections' statements were finalized. (Checked
    // most recent first: a statement prepared again evicts the least recently used one.)
    for (const [i, c] of [...all.entries()].reverse()) {
      const before = c.prepares();
      await querySql(c.db, select, ones);
      expect(c.prepares() - before, `connection ${String(i)}`).to.equal(i < 2 ? 1 : 0);
    }
    for (const c of all) {
      await releaseStatements(c.db);
      expect(await close(c.db)).to.equal(null);
    }
  });

  it('without releaseStatements, SQLite refuses to close the connection (why stores release first)', async () => {
    keepStatements(conn.db);
    await querySql(conn.db, 'SELECT 1 AS n', []);
    const err = await close(conn.db);
    expect(err).to.be.instanceOf(Error);
    await releaseStatements(conn.db);
    expect(await close(conn.db)).to.equal(null);
  });
});
