/**
 * Restore refuses a backup whose snapshot was tampered with or truncated, even when whoever
 * edited it recomputed the manifest's checksums: the snapshot's audit chain must verify end to
 * end, and the manifest's counts, audit head and DEK versions must be the snapshot's own.
 * (What this cannot stop without an authenticated manifest, a manifest rewritten to match a
 * consistently truncated snapshot, is described in tenants/DATA-PLANE.md.)
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import { BackupError } from '../../../tenants/data-plane.ts';
import type { BackupResult } from '../../../tenants/data-plane.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { BackendName, Env } from './helpers.ts';

interface EventRow {
  seq: number;
  hash: string;
  type: string;
}

/** The snapshot of a backup folder, edited the way someone with write access to it could. */
interface Snapshot {
  events(): Promise<EventRow[]>;
  /** Deletes invocations with their card links. */
  deleteInvocations(ids: string[]): Promise<void>;
  deleteEvents(seqs: number[]): Promise<void>;
  setHead(seq: number, hash: string): Promise<void>;
  setEventActor(seq: number, actor: string): Promise<void>;
  /** Writes the snapshot back and recomputes the manifest's sha256 and size for it. */
  save(): Promise<void>;
}

function copyDir(from: string, to: string): string {
  fs.cpSync(from, to, { recursive: true });
  return to;
}

function patchManifest(dir: string, patch: (m: Record<string, unknown>) => void): void {
  const file = path.join(dir, 'manifest.json');
  const m = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  patch(m);
  fs.writeFileSync(file, JSON.stringify(m));
}

function fixChecksum(dir: string, name: string): void {
  const data = fs.readFileSync(path.join(dir, name));
  patchManifest(dir, (m) => {
    for (const f of m.files as Array<{ name: string; sha256: string; bytes: number }>) {
      if (f.name === name) {
        f.sha256 = crypto.createHash('sha256').update(data).digest('hex');
        f.bytes = data.length;
      }
    }
  });
}

async function openSnapshot(backend: BackendName, dir: string): Promise<Snapshot> {
  if (backend === 'sqlite') {
    const db = new Sequelize({
      dialect: 'sqlite',
      storage: path.join(dir, 'store.sqlite'),
      logging: false,
    });
    await db.query('DROP TRIGGER IF EXISTS audit_events_no_update');
    await db.query('DROP TRIGGER IF EXISTS audit_events_no_delete');
    const inList = (xs: Array<string | number>) => xs.map((x) => db.escape(x)).join(',');
    return {
      events: () =>
        db.query<EventRow>('SELECT seq, hash, type FROM audit_events ORDER BY seq', {
          type: QueryTypes.SELECT,
        }),
      async deleteInvocations(ids) {
        await db.query(`DELETE FROM invocation_cards WHERE invocation_id IN (${inList(ids)})`);
        await db.query(`DELETE FROM invocations WHERE id IN (${inList(ids)})`);
      },
      async deleteEvents(seqs) {
        await db.query(`DELETE FROM audit_events WHERE seq IN (${inList(seqs)})`);
      },
      async setHead(seq, hash) {
        await db.query('UPDATE audit_head SET seq = :seq, hash = :hash', {
          replacements: { seq, hash },
        });
      },
      async setEventActor(seq, actor) {
        await db.query('UPDATE audit_events SET actor = :actor WHERE seq = :seq', {
          replacements: { seq, actor },
        });
      },
      async save() {
        // Put the append-only triggers back, so the store looks untouched.
        await db.query(`CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
          BEGIN SELECT RAISE(ABORT, 'audit chain is append-only'); END`);
        await db.query(`CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
          BEGIN SELECT RAISE(ABORT, 'audit chain is append-only'); END`);
        await db.query('VACUUM');
        await db.close();
        fixChecksum(dir, 'store.sqlite');
      },
    };
  }
  const file = path.join(dir, 'store.json');
  const dump = JSON.parse(fs.readFileSync(file, 'utf8')) as {
    tables: Record<string, Array<Record<string, unknown>>>;
  };
  const table = (name: string) => dump.tables[name] ?? [];
  const keep = (name: string, pred: (row: Record<string, unknown>) => boolean) => {
    dump.tables[name] = table(name).filter(pred);
  };
  return {
    events: () =>
      Promise.resolve(
        table('audit_events')
          .map((r) => ({ seq: Number(r.seq), hash: String(r.hash), type: String(r.type) }))
          .sort((a, b) => a.seq - b.seq),
      ),
    deleteInvocations(ids) {
      keep('invocation_cards', (r) => !ids.includes(String(r.invocationId)));
      keep('invocations', (r) => !ids.includes(String(r.id)));
      return Promise.resolve();
    },
    deleteEvents(seqs) {
      keep('audit_events', (r) => !seqs.includes(Number(r.seq)));
      return Promise.resolve();
    },
    setHead(seq, hash) {
      for (const r of table('audit_head')) {
        r.seq = seq;
        r.hash = hash;
      }
      return Promise.resolve();
    },
    setEventActor(seq, actor) {
      for (const r of table('audit_events')) {
        if (Number(r.seq) === seq) {
          r.actor = actor;
        }
      }
      return Promise.resolve();
    },
    save() {
      fs.writeFileSync(file, JSON.stringify(dump));
      fixChecksum(dir, 'store.json');
      return Promise.resolve();
    },
  };
}

async function refusal(p: Promise<unknown>): Promise<BackupError> {
  return asInstance(await rejection(p), BackupError);
}

forEachBackend('tenants/ data plane: restore refuses tampered or truncated backups', (backend) => {
  let env: Env;
  let backup: BackupResult;
  let n = 0;
  beforeEach(async () => {
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    for (let i = 1; i <= 5; i += 1) {
      await s.saveInvocation(invocation(`inv-${i}`));
    }
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    await s.readInvocation('inv-2', { actor: 'auditor' });
    for (const type of ['test.one', 'test.two']) {
      await s.audit.append({ type, outcome: 'success' });
    }
    backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-after-backup'));
  });
  afterEach(async () => {
    await env.close();
  });

  const tampered = (): string => {
    n += 1;
    return copyDir(backup.path, path.join(env.dir, `tampered-${String(n)}`));
  };

  /** The live store is exactly what it was before the refused restore. */
  async function expectLiveUntouched(): Promise<void> {
    const s = env.stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id).sort()).to.deep.equal(
      ['inv-1', 'inv-2', 'inv-3', 'inv-4', 'inv-5', 'inv-after-backup'].sort(),
    );
    expect(await s.audit.verify()).to.include({ ok: true });
    expect((await s.audit.list()).map((e) => e.type)).to.not.include('backup.restored');
    if (backend === 'sqlite') {
      const left = fs
        .readdirSync(path.join(env.dataDir, env.region))
        .filter((f) => f.includes('.restore-'));
      expect(left, 'staged copies left behind').to.deep.equal([]);
    }
  }

  it('returns the counts of the restored store and restores a backup nobody touched', async () => {
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    const s = env.stores.store('acme');
    const restored = (await s.audit.list({ limit: 10_000 })).find(
      (e) => e.type === 'backup.restored',
    );
    expect(result.counts).to.deep.equal({
      invocations: (await s.listInvocations()).length,
      feedback: 1,
      auditEvents: (restored?.seq ?? 0) - 1, // the snapshot's events come before it
    });
    expect(result.counts.invocations).to.equal(5);
    expect(await s.audit.verify()).to.include({ ok: true });
  });

  it('refuses a backup with records and the last audit events deleted, the audit head re-anchored and the checksums recomputed', async () => {
    const dir = tampered();
    const snap = await openSnapshot(backend, dir);
    const events = await snap.events();
    const read = events.find((e) => e.type === 'record.read');
    expect(read, 'the auditor read is in the snapshot').to.not.equal(undefined);
    const kept = events.filter((e) => e.seq < (read?.seq ?? 0));
    const last = kept[kept.length - 1];
    await snap.deleteInvocations(['inv-4', 'inv-5']);
    await snap.deleteEvents(events.filter((e) => e.seq >= (read?.seq ?? 0)).map((e) => e.seq));
    await snap.setHead(last?.seq ?? 0, last?.hash ?? '');
    await snap.save();

    const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
    expect(err.reason).to.equal('manifest_mismatch');
    expect(err.message).to.match(/invocations 5 in the manifest, 3 in the snapshot/);
    await expectLiveUntouched();
  });

  const manifestEdits: Array<[string, (m: Record<string, unknown>) => void]> = [
    ['one invocation more', (m) => ((m.counts as { invocations: number }).invocations += 1)],
    ['one feedback item fewer', (m) => ((m.counts as { feedback: number }).feedback -= 1)],
    ['one audit event fewer', (m) => ((m.counts as { auditEvents: number }).auditEvents -= 1)],
    ['an earlier audit head', (m) => ((m.auditHead as { seq: number }).seq -= 1)],
    ['another audit head hash', (m) => ((m.auditHead as { hash: string }).hash = 'f'.repeat(64))],
    [
      'an extra DEK version',
      (m) => (m.dekVersions as unknown[]).push({ version: 9, status: 'active', kekVersion: 1 }),
    ],
    [
      'another DEK status',
      (m) => ((m.dekVersions as Array<{ status: string }>)[0]!.status = 'retired'),
    ],
  ];
  for (const [name, edit] of manifestEdits) {
    it(`refuses a manifest that does not describe its snapshot: ${name} (manifest_mismatch)`, async () => {
      const dir = tampered();
      patchManifest(dir, edit);
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason).to.equal('manifest_mismatch');
      await expectLiveUntouched();
    });
  }

  const chainEdits: Array<[string, string, (snap: Snapshot, events: EventRow[]) => Promise<void>]> =
    [
      [
        'an edited event',
        'hash_mismatch',
        (snap, events) => snap.setEventActor(events[1]?.seq ?? 2, 'someone'),
      ],
      [
        'a deleted event in the middle',
        'seq_gap',
        (snap, events) => snap.deleteEvents([events[1]?.seq ?? 2]),
      ],
      [
        'an audit head that names another hash',
        'anchor_mismatch',
        async (snap, events) => {
          const last = events[events.length - 1];
          await snap.setHead(last?.seq ?? 0, 'e'.repeat(64));
        },
      ],
    ];
  for (const [name, problem, edit] of chainEdits) {
    it(`refuses a snapshot whose audit chain is broken by ${name}, checksums recomputed (audit_chain)`, async () => {
      const dir = tampered();
      const snap = await openSnapshot(backend, dir);
      await edit(snap, await snap.events());
      await snap.save();
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason).to.equal('audit_chain');
      expect(err.message, err.message).to.include(problem);
      await expectLiveUntouched();
    });
  }
});
