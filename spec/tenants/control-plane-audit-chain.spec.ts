import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import { openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';

/** Runs SQL on the database file as an attacker with file access would (triggers dropped). */
function tamper(file: string, ...statements: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(file);
    db.serialize(() => {
      db.run('DROP TRIGGER IF EXISTS audit_events_no_update');
      db.run('DROP TRIGGER IF EXISTS audit_events_no_delete');
      for (const sql of statements) {
        db.run(sql);
      }
    });
    db.close((err) => {
      err ? reject(err) : resolve();
    });
  });
}

describe('control-plane audit log: hash chain', () => {
  let dir: string;
  let file: string;
  let cp: ControlPlane;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cpchain-'));
    file = path.join(dir, 'control.sqlite');
    cp = await openControlPlane({ storage: file });
    for (let i = 1; i <= 6; i++) {
      await cp.audit.record({
        type: 'admin.test',
        outcome: 'success',
        actor: `op-${i}`,
        detail: { n: i },
      });
    }
    expect(await cp.audit.verify()).to.deep.equal({ ok: true, count: 6 });
    await cp.close();
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const reopenAndVerify = async () => {
    const again = await openControlPlane({ storage: file });
    try {
      return await again.audit.verify();
    } finally {
      await again.close();
    }
  };

  it('refuses UPDATE and DELETE through SQL (append-only triggers)', async () => {
    const again = await openControlPlane({ storage: file });
    try {
      let refused = 0;
      for (const sql of [
        "UPDATE audit_events SET actor = 'x' WHERE seq = 2",
        'DELETE FROM audit_events WHERE seq = 2',
      ]) {
        await new Promise<void>((resolve) => {
          const db = new sqlite3.Database(file);
          db.run(sql, (err) => {
            if (err) {
              refused++;
            }
            db.close(() => {
              resolve();
            });
          });
        });
      }
      expect(refused).to.equal(2);
    } finally {
      await again.close();
    }
  });

  const cases: Array<[string, string[], string]> = [
    [
      'an edited event',
      ["UPDATE audit_events SET actor = 'someone-else' WHERE seq = 3"],
      'hash_mismatch',
    ],
    ['a deleted event in the middle', ['DELETE FROM audit_events WHERE seq = 3'], 'seq_gap'],
    ['the deleted last event', ['DELETE FROM audit_events WHERE seq = 6'], 'anchor_mismatch'],
    [
      'two reordered events',
      [
        'UPDATE audit_events SET seq = 100 WHERE seq = 2',
        'UPDATE audit_events SET seq = 2 WHERE seq = 3',
        'UPDATE audit_events SET seq = 3 WHERE seq = 100',
      ],
      'broken_link',
    ],
  ];
  for (const [name, sql, problem] of cases) {
    it(`detects ${name}`, async () => {
      await tamper(file, ...sql);
      const result = await reopenAndVerify();
      expect(result.ok).to.equal(false);
      expect(result.problem).to.equal(problem);
    });
  }
});
