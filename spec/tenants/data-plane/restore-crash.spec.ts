/**
 * A SQLite restore SIGKILLed at any point of its swap leaves the tenant with either its old
 * store (whole, including what its WAL held) or the restored one, never with no store (which
 * the next hook call would silently replace by an empty one under a new DEK). The live store
 * starts with a hot WAL (a writer was SIGKILLed after its ack), whose frames belong to the old
 * database and must never be applied to the restored file. A staged copy left by a crash is
 * removed by the next restore of the tenant.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import { ConflictError } from '../../../tenants/errors.ts';
import type { BackupResult, RegionStores } from '../../../tenants/data-plane.ts';
import type { CrashPoint } from './child/restore-worker.ts';
import { invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../../..');

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a child worker to its end (or its death). */
function run(worker: string, args: object, until?: (stdout: string) => boolean): Promise<Exit> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', path.join(HERE, 'child', worker), JSON.stringify(args)],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  child.stdout.on('data', (d: Buffer) => {
    stdout += d.toString('utf8');
    if (until?.(stdout)) {
      child.kill('SIGKILL');
    }
  });
  return new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      resolve({ code, signal, stdout, stderr });
    });
  });
}

const OLD = ['acked-hot', 'inv-1', 'inv-2', 'inv-3', 'inv-4'];
const RESTORED = ['inv-1', 'inv-2', 'inv-3'];

const points: Array<[CrashPoint, string, string[]]> = [
  ['copied', 'after staging its copy', OLD],
  ['before-wal-removal', 'before removing the old WAL', OLD],
  ['before-rename', 'just before the rename', OLD],
  ['after-rename', 'just after the rename', RESTORED],
];

describe('tenants/ data plane: a SQLite restore SIGKILLed mid-swap (crash safety)', () => {
  let env: Env;
  let backup: BackupResult;
  let stores: RegionStores;
  let regionDir: string;
  let live: string;

  beforeEach(async function () {
    this.timeout(60_000);
    env = await makeEnv('sqlite');
    regionDir = path.join(env.dataDir, env.region);
    live = path.join(regionDir, 'acme.sqlite');
    const s = env.stores.store('acme');
    for (const id of RESTORED) {
      await s.saveInvocation(invocation(id));
    }
    backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-4'));
    await env.stores.close();
    // A writer killed right after its ack leaves its record in the live store's WAL only.
    const hot = await run(
      'store-worker.ts',
      { mode: 'save', env: env.childOptions(), tenant: 'acme', id: 'acked-hot' },
      (out) => out.includes('ack acked-hot\n'),
    );
    expect(hot.signal, hot.stderr).to.equal('SIGKILL');
    expect(fs.statSync(`${live}-wal`).size, 'the live store has a hot WAL').to.be.greaterThan(0);
  });
  afterEach(async () => {
    await env.close();
  });

  it('refuses the swap (409) while another connection reads the live store, and changes nothing', async function () {
    this.timeout(60_000);
    const reader = new sqlite3.Database(live, sqlite3.OPEN_READONLY);
    const all = (sql: string) =>
      new Promise<unknown[]>((resolve, reject) => {
        reader.all(sql, (err: Error | null, rows: unknown[]) => {
          if (err) {
            reject(err);
          } else {
            resolve(rows);
          }
        });
      });
    try {
      await all('BEGIN');
      await all('SELECT count(*) FROM invocations'); // holds a read snapshot of the WAL
      stores = await env.reopen();
      const err = await rejection(stores.restoreTenant(backup.path, { tenant: 'acme' }));
      expect(err).to.be.instanceOf(ConflictError);
      await all('COMMIT');
    } finally {
      await new Promise<void>((resolve) => {
        reader.close(() => {
          resolve();
        });
      });
    }
    expect(fs.readdirSync(regionDir).filter((f) => f.includes('.restore-'))).to.deep.equal([]);
    const s = stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id).sort()).to.deep.equal(OLD);
    expect(await s.audit.verify()).to.include({ ok: true });
  });

  for (const [point, when, expected] of points) {
    it(`killed ${when}: the tenant keeps its ${expected === OLD ? 'old' : 'restored'} store, whole, readable, under its own key`, async function () {
      this.timeout(90_000);
      const died = await run('restore-worker.ts', {
        env: env.childOptions(),
        tenant: 'acme',
        backup: backup.path,
        point,
      });
      expect(died.signal, `${died.stdout}${died.stderr}`).to.equal('SIGKILL');

      // The restarted process: the first hook call must find the store, not create one; and
      // the staged copy the killed restore left (if any) is gone as soon as the region opens.
      const staged = () => fs.readdirSync(regionDir).filter((f) => f.includes('.restore-'));
      if (point !== 'after-rename') {
        expect(staged().length, 'the killed restore left its staged copy').to.equal(1);
      }
      stores = await env.reopen();
      expect(staged()).to.deep.equal([]);
      expect(await stores.listTenants()).to.deep.equal(['acme']);
      const s = stores.store('acme');
      expect((await s.listInvocations()).map((r) => r.id).sort()).to.deep.equal(expected);
      for (const id of expected) {
        const marker = id === 'acked-hot' ? 'ACKacked-hot' : 'PHI';
        expect((await s.readInvocation(id)).secret.trace).to.deep.equal([
          { rule: 'r1', matched: `${marker}-trace` },
        ]);
      }
      expect((await s.keys.status()).versions.map((v) => v.version)).to.deep.equal([1]);
      expect(await s.audit.verify()).to.include({ ok: true });
      await s.saveInvocation(invocation('inv-after-crash'));
      expect((await s.readInvocation('inv-after-crash')).id).to.equal('inv-after-crash');

      // Running the restore again finishes the job and clears what the crash left behind.
      const again = await stores.restoreTenant(backup.path, { tenant: 'acme' });
      expect(again.counts.invocations).to.equal(RESTORED.length);
      expect((await stores.store('acme').listInvocations()).map((r) => r.id).sort()).to.deep.equal(
        RESTORED,
      );
      expect(await stores.store('acme').audit.verify()).to.include({ ok: true });
      expect(fs.readdirSync(regionDir).filter((f) => f.includes('.restore-'))).to.deep.equal([]);
    });
  }
});
