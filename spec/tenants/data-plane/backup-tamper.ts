/**
 * Edits a backup folder the way someone with write access to it (and without the key provider)
 * could: the snapshot's rows, its audit chain and head, the manifest. Shared by the backup specs.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QueryTypes, Sequelize } from 'sequelize';
// A namespace import: the specs that use this file also run against a checkout without
// `signBackupManifest` (to show they fail there), and only `resign` needs it.
import * as backupModule from '../../../tenants/data-plane/backup.ts';
import type { BackupManifest, UnsignedManifest } from '../../../tenants/data-plane/backup.ts';
import type { KeyProvider } from '../../../tenants/data-plane.ts';
import type { BackendName } from './helpers.ts';

export interface EventRow {
  seq: number;
  hash: string;
  type: string;
}

/** The snapshot of a backup folder, edited the way someone with write access to it could. */
export interface Snapshot {
  events(): Promise<EventRow[]>;
  /** Deletes invocations with their card links. */
  deleteInvocations(ids: string[]): Promise<void>;
  deleteEvents(seqs: number[]): Promise<void>;
  setHead(seq: number, hash: string): Promise<void>;
  setEventActor(seq: number, actor: string): Promise<void>;
  /** Writes the snapshot back and recomputes the manifest's sha256 and size for it. */
  save(): Promise<void>;
}

export function copyDir(from: string, to: string): string {
  fs.cpSync(from, to, { recursive: true });
  return to;
}

export function patchManifest(dir: string, patch: (m: Record<string, unknown>) => void): void {
  const file = path.join(dir, 'manifest.json');
  const m = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  patch(m);
  fs.writeFileSync(file, JSON.stringify(m));
}

export function fixChecksum(dir: string, name: string): void {
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

export async function openSnapshot(backend: BackendName, dir: string): Promise<Snapshot> {
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

export function readManifest(dir: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as Record<
    string,
    unknown
  >;
}

/**
 * Authenticates the folder's manifest again with the region's provider, as only the service
 * (or whoever holds the provider) can: what a rewritten manifest would need to be accepted.
 */
export async function resign(provider: KeyProvider, dir: string): Promise<void> {
  const m = readManifest(dir) as unknown as BackupManifest;
  const body: UnsignedManifest = {
    tenant: m.tenant,
    region: m.region,
    dialect: m.dialect,
    createdAt: m.createdAt,
    files: m.files,
    counts: m.counts,
    auditHead: m.auditHead,
    dekVersions: m.dekVersions,
  };
  const signed = await backupModule.signBackupManifest(provider, body);
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(signed));
}

/** Rewrites the manifest as a format-1 manifest (no backup id, no MAC key, no MAC). */
export function downgradeToFormat1(dir: string): void {
  patchManifest(dir, (m) => {
    m.format = 'cellcds-tenant-backup/1';
    delete m.backupId;
    delete m.macKey;
    delete m.mac;
  });
}

/**
 * Cuts the snapshot short consistently, as an attacker would: deletes `invocations` (with their
 * card links) and every audit event from the last of type `fromEventType` on, re-anchors the
 * audit head on the last event kept, and rewrites the manifest to match (sha256 and size of the
 * snapshot, counts, audit head). Everything but the manifest's MAC agrees.
 */
export async function truncateLikeAnAttacker(
  backend: BackendName,
  dir: string,
  opts: { invocations: string[]; fromEventType: string },
): Promise<{ invocations: number; auditEvents: number }> {
  const snap = await openSnapshot(backend, dir);
  const events = await snap.events();
  const cut = [...events].reverse().find((e) => e.type === opts.fromEventType);
  if (!cut) {
    throw new Error(`no ${opts.fromEventType} event in the snapshot`);
  }
  const kept = events.filter((e) => e.seq < cut.seq);
  const last = kept[kept.length - 1];
  await snap.deleteInvocations(opts.invocations);
  await snap.deleteEvents(events.filter((e) => e.seq >= cut.seq).map((e) => e.seq));
  await snap.setHead(last?.seq ?? 0, last?.hash ?? '');
  await snap.save();
  const m = readManifest(dir) as unknown as BackupManifest;
  const counts = {
    invocations: m.counts.invocations - opts.invocations.length,
    auditEvents: kept.length,
  };
  patchManifest(dir, (raw) => {
    const c = raw.counts as { invocations: number; auditEvents: number };
    c.invocations = counts.invocations;
    c.auditEvents = counts.auditEvents;
    raw.auditHead = { seq: last?.seq ?? 0, hash: last?.hash ?? '' };
  });
  return counts;
}
