import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { ConflictError, InvalidInputError, NotFoundError } from '../../../tenants/errors.ts';
import {
  BackupError,
  KeyUnavailableError,
  keyringPath,
  migrateTenant,
  readMigrationState,
} from '../../../tenants/data-plane.ts';
import type {
  MigrationPhase,
  MigrationProgress,
  MigrationRegion,
  RegionStores,
} from '../../../tenants/data-plane.ts';
import {
  asInstance,
  filesContaining,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
} from './helpers.ts';
import type { BackendName, Env } from './helpers.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WORKER = path.join(HERE, 'child', 'migration-worker.ts');
const ROOT = path.resolve(HERE, '../../..');
const TENANT = 'acme-health';
const MIGRATION_EVENTS = [
  'migration.started',
  'migration.rewrapped',
  'migration.copied',
  'migration.committed',
  'migration.source_shredded',
  'migration.completed',
];

interface Pair {
  src: Env;
  dst: Env;
  stateDir: string;
  marker: string;
  ids: string[];
  /** Stores opened by `open`, closed after the spec. */
  opened: RegionStores[];
  open(): Promise<{ source: MigrationRegion; target: MigrationRegion }>;
  close(): Promise<void>;
}

/** Two regions in their own temp dirs and keyrings; the tenant lives in us-east with records. */
async function makePair(backend: BackendName): Promise<Pair> {
  const src = await makeEnv(backend, { region: 'us-east' });
  const dst = await makeEnv(backend, { region: 'eu-west' });
  const marker = `MIGR${crypto.randomBytes(4).toString('hex')}`;
  const store = src.stores.store(TENANT);
  const ids = ['inv-1', 'inv-2', 'inv-3'];
  for (const id of ids.slice(0, 2)) {
    await store.saveInvocation(invocation(id, marker));
  }
  // A second DEK version (v1 destroyed once the rewrap ends): destroyed rows travel too.
  const job = await store.keys.rotate({ actor: 'spec' });
  await src.stores.waitForJob(job.id);
  await store.saveInvocation(invocation('inv-3', marker));
  await store.saveFeedback(
    [
      {
        card: 'card-inv-1',
        outcome: 'overridden',
        overrideReason: { userComment: `${marker}-comment` },
        outcomeTimestamp: '2025-01-01T12:05:00Z',
      },
    ],
    { service: 'med-safety' },
  );
  await src.stores.close();
  await dst.stores.close();
  const opened: RegionStores[] = [];
  return {
    src,
    dst,
    stateDir: path.join(dst.dir, 'migrations'),
    marker,
    ids,
    opened,
    async open() {
      const s = await src.reopen();
      const d = await dst.reopen();
      opened.push(s, d);
      return {
        source: { stores: s, keyProvider: src.provider },
        target: { stores: d, keyProvider: dst.provider },
      };
    },
    async close() {
      for (const s of opened) {
        await s.close().catch(() => undefined);
      }
      await src.close();
      await dst.close();
    },
  };
}

/** The home region as the control plane would hold it (the commit point). */
function homeRecorder(): {
  home: string;
  commits: number;
  commit(p: MigrationProgress): Promise<void>;
} {
  const r = {
    home: 'us-east',
    commits: 0,
    commit(p: MigrationProgress) {
      r.commits += 1;
      r.home = p.to;
      return Promise.resolve();
    },
  };
  return r;
}

async function closeRegions(...regions: MigrationRegion[]): Promise<void> {
  for (const r of regions) {
    await r.stores.close();
  }
}

/** Data readable only in eu-west; nothing of the tenant left in us-east. */
async function expectOnlyInTarget(p: Pair): Promise<void> {
  const { source, target } = await p.open();
  // Target: every record opens, feedback included, and the chain is intact.
  const store = target.stores.store(TENANT);
  for (const id of p.ids) {
    const rec = await store.readInvocation(id, { actor: 'spec' });
    expect(JSON.stringify(rec.secret)).to.include(`${p.marker}-patient`);
  }
  const first = await store.readInvocation('inv-1', { actor: 'spec' });
  expect(first.feedback).to.have.length(1);
  expect(first.feedback[0]?.item.overrideReason?.userComment).to.equal(`${p.marker}-comment`);
  expect((await store.audit.verify()).ok).to.equal(true);
  const types = (await store.audit.list({ limit: 10_000 })).map((e) => e.type);
  for (const t of MIGRATION_EVENTS) {
    expect(
      types.filter((x) => x === t),
      t,
    ).to.have.length(1);
  }
  const keys = await store.keys.status();
  expect(keys.versions.map((v) => v.status)).to.deep.equal(['destroyed', 'primary']);
  expect(await target.keyProvider.hasTenantKey(TENANT)).to.equal(true);

  // Source: no store, no tenant key (a tombstone only), no marker anywhere under its folders.
  expect(await source.stores.listTenants()).to.not.include(TENANT);
  expect(await source.keyProvider.hasTenantKey(TENANT)).to.equal(false);
  const ring = JSON.parse(fs.readFileSync(keyringPath(p.src.keyDir, 'us-east'), 'utf8')) as {
    tenants: Record<string, unknown>;
    destroyed: Record<string, string>;
  };
  expect(ring.tenants).to.not.have.property(TENANT);
  expect(ring.destroyed).to.have.property(TENANT);
  if (p.src.backend === 'sqlite') {
    const left = fs.readdirSync(path.join(p.src.dataDir, 'us-east'));
    expect(left.filter((f) => f.includes(TENANT))).to.deep.equal([]);
  }
  expect(filesContaining(p.src.dir, p.marker)).to.deep.equal([]);
  expect(filesContaining(p.dst.dir, p.marker)).to.deep.equal([]);
  // Only the checkpoint is left in the state folder: no snapshot, no staged copy.
  expect(fs.readdirSync(p.stateDir)).to.deep.equal([`${TENANT}.migration.json`]);
  expect(readMigrationState(p.stateDir, TENANT)?.phase).to.equal('done');
  await closeRegions(source, target);
}

forEachBackend('tenant migration between regions', (backend) => {
  let p: Pair;
  beforeEach(async () => {
    p = await makePair(backend);
  });
  afterEach(async () => {
    await p.close();
  });

  it('moves the store to the target, rewraps the DEKs under its KEK and shreds the source', async () => {
    // An old backup in the source region: after the migration its DEKs must not unwrap.
    const pre = await p.open();
    const old = await pre.source.stores.backupTenant(TENANT, p.src.backupDir);
    await closeRegions(pre.source, pre.target);
    const oldDeks = JSON.parse(fs.readFileSync(path.join(old.path, 'deks.json'), 'utf8')) as {
      deks: Array<{ version: number; wrapped: string | null }>;
    };

    const { source, target } = await p.open();
    const home = homeRecorder();
    const phases: MigrationPhase[] = [];
    const result = await migrateTenant({
      tenant: TENANT,
      source,
      target,
      stateDir: p.stateDir,
      actor: 'platform-operator:op1',
      commit: (x) => home.commit(x),
      onProgress: (x) => {
        phases.push(x.phase);
      },
    });
    expect(phases).to.deep.equal([
      'frozen',
      'rewrapped',
      'copied',
      'committed',
      'shredded',
      'done',
    ]);
    expect(result).to.include({ phase: 'done', from: 'us-east', to: 'eu-west', resumed: false });
    expect(result.verifiedRecords).to.equal(4); // 3 invocations + 1 feedback
    expect(result.deks).to.equal(1);
    expect(result.shred).to.deep.equal({
      tenantKeyDestroyed: true,
      dekVersionsDestroyed: 1,
      storeDeleted: true,
    });
    expect(home).to.include({ home: 'eu-west', commits: 1 });
    // Running it again is a no-op that reports the finished migration.
    const again = await migrateTenant({
      tenant: TENANT,
      source,
      target,
      stateDir: p.stateDir,
      commit: (x) => home.commit(x),
    });
    expect(again).to.include({ phase: 'done', resumed: true });
    expect(home.commits).to.equal(1);
    await closeRegions(source, target);

    await expectOnlyInTarget(p);
    const live = oldDeks.deks.find((d) => d.wrapped !== null);
    const err = await rejection(
      p.src.provider.unwrapDek(
        TENANT,
        live?.wrapped ?? '',
        `us-east|${TENANT}|dek|${live?.version ?? 0}`,
      ),
    );
    expect(asInstance(err, KeyUnavailableError).reason).to.equal('tenant_key_destroyed');
  });

  const stops: MigrationPhase[] = [
    'frozen',
    'rewrapped',
    'copied',
    'committed',
    'shredded',
    'done',
  ];
  for (const stop of stops) {
    it(`resumes after a failure right after the ${stop} checkpoint and ends with the data only in the target`, async () => {
      const home = homeRecorder();
      const first = await p.open();
      const err = await rejection(
        migrateTenant({
          tenant: TENANT,
          ...first,
          stateDir: p.stateDir,
          commit: (x) => home.commit(x),
          onProgress: (x) => {
            if (x.phase === stop) {
              throw new Error(`injected failure after ${stop}`);
            }
          },
        }),
      );
      expect(err.message).to.equal(`injected failure after ${stop}`);
      expect(readMigrationState(p.stateDir, TENANT)?.phase).to.equal(stop);
      await closeRegions(first.source, first.target);

      // A new process: fresh handles on the same storage and keyrings.
      const second = await p.open();
      const result = await migrateTenant({
        tenant: TENANT,
        ...second,
        stateDir: p.stateDir,
        commit: (x) => home.commit(x),
      });
      expect(result).to.include({ phase: 'done', resumed: true, verifiedRecords: 4 });
      expect(home.home).to.equal('eu-west');
      await closeRegions(second.source, second.target);
      await expectOnlyInTarget(p);
    });
  }

  it('does not commit while the control-plane commit fails, and commits once it succeeds', async () => {
    const home = homeRecorder();
    const first = await p.open();
    const err = await rejection(
      migrateTenant({
        tenant: TENANT,
        ...first,
        stateDir: p.stateDir,
        commit: () => Promise.reject(new Error('control plane down')),
      }),
    );
    expect(err.message).to.equal('control plane down');
    expect(readMigrationState(p.stateDir, TENANT)?.phase).to.equal('copied');
    // The source is untouched until the commit: it still holds its key and store.
    expect(await first.source.keyProvider.hasTenantKey(TENANT)).to.equal(true);
    expect(await first.source.stores.listTenants()).to.include(TENANT);
    const result = await migrateTenant({
      tenant: TENANT,
      ...first,
      stateDir: p.stateDir,
      commit: (x) => home.commit(x),
    });
    expect(result.phase).to.equal('done');
    await closeRegions(first.source, first.target);
    await expectOnlyInTarget(p);
  });

  it('refuses to commit when the source was written after the snapshot, then starts over', async () => {
    const home = homeRecorder();
    const first = await p.open();
    await rejection(
      migrateTenant({
        tenant: TENANT,
        ...first,
        stateDir: p.stateDir,
        commit: (x) => home.commit(x),
        onProgress: (x) => {
          if (x.phase === 'copied') {
            throw new Error('stop');
          }
        },
      }),
    );
    // A write that slipped past the suspension.
    await first.source.stores.store(TENANT).saveInvocation(invocation('inv-4', p.marker));
    const err = await rejection(
      migrateTenant({
        tenant: TENANT,
        ...first,
        stateDir: p.stateDir,
        commit: (x) => home.commit(x),
      }),
    );
    expect(err).to.be.instanceOf(ConflictError);
    expect(home.commits).to.equal(0);
    expect(readMigrationState(p.stateDir, TENANT)).to.include({ phase: 'started', restarts: 1 });
    const result = await migrateTenant({
      tenant: TENANT,
      ...first,
      stateDir: p.stateDir,
      commit: (x) => home.commit(x),
    });
    expect(result.verifiedRecords).to.equal(5);
    await closeRegions(first.source, first.target);
    p.ids.push('inv-4');
    await expectOnlyInTarget(p);
  });

  const waiting: Array<['frozen' | 'rewrapped', 'snapshot' | 'staged']> = [
    ['frozen', 'snapshot'],
    ['rewrapped', 'staged'],
  ];
  for (const [stop, folder] of waiting) {
    it(`refuses the ${folder} copy's manifest altered while stopped after ${stop} (manifest_signature), and takes one with no MAC again`, async () => {
      const home = homeRecorder();
      const first = await p.open();
      const run = () =>
        migrateTenant({
          tenant: TENANT,
          ...first,
          stateDir: p.stateDir,
          commit: (x) => home.commit(x),
        });
      await rejection(
        migrateTenant({
          tenant: TENANT,
          ...first,
          stateDir: p.stateDir,
          commit: (x) => home.commit(x),
          onProgress: (x) => {
            if (x.phase === stop) {
              throw new Error('stop');
            }
          },
        }),
      );
      const state = readMigrationState(p.stateDir, TENANT) as Record<string, unknown> | undefined;
      const file = path.join(String(state?.[folder]), 'manifest.json');
      const genuine = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
      expect(genuine.format).to.equal('cellcds-tenant-backup/2');
      // Altered (its time, nothing else): refused, nothing moves.
      const altered = structuredClone(genuine);
      (altered.createdAt as string) = '2031-01-01T00:00:00.000Z';
      fs.writeFileSync(file, JSON.stringify(altered));
      const err = asInstance(await rejection(run()), BackupError);
      expect(err.reason).to.equal('manifest_signature');
      expect(readMigrationState(p.stateDir, TENANT)?.phase).to.equal(stop);
      expect(home.commits).to.equal(0);
      // No MAC at all (as an older release wrote it): the migration starts over from a new one.
      const v1 = structuredClone(genuine);
      v1.format = 'cellcds-tenant-backup/1';
      delete v1.backupId;
      delete v1.macKey;
      delete v1.mac;
      fs.writeFileSync(file, JSON.stringify(v1));
      const restarted = await rejection(run());
      expect(restarted).to.be.instanceOf(ConflictError);
      expect(restarted.message).to.include('carries no MAC');
      expect(readMigrationState(p.stateDir, TENANT)?.phase).to.equal('started');
      expect(await run()).to.include({ phase: 'done', verifiedRecords: 4 });
      expect(home.commits).to.equal(1);
      await closeRegions(first.source, first.target);
      await expectOnlyInTarget(p);
    });
  }

  it('refuses bad requests before anything moves', async () => {
    const { source, target } = await p.open();
    const run = (over: Partial<Parameters<typeof migrateTenant>[0]>) =>
      rejection(
        migrateTenant({
          tenant: TENANT,
          source,
          target,
          stateDir: p.stateDir,
          commit: () => Promise.reject(new Error('must not commit')),
          ...over,
        }),
      );
    expect(await run({ target: source })).to.be.instanceOf(InvalidInputError);
    expect(
      await run({ target: { stores: target.stores, keyProvider: source.keyProvider } }),
    ).to.be.instanceOf(InvalidInputError);
    expect(await run({ tenant: 'no-such-tenant' })).to.be.instanceOf(NotFoundError);
    // The target already holds a store of the tenant.
    await target.stores.provisionTenant(TENANT);
    expect(await run({})).to.be.instanceOf(ConflictError);
    await target.stores.deprovisionTenant(TENANT);
    // Nothing moved: the source still serves every record; no checkpoint was written.
    for (const id of p.ids) {
      await source.stores.store(TENANT).readInvocation(id);
    }
    expect(readMigrationState(p.stateDir, 'no-such-tenant')).to.equal(undefined);
    expect(readMigrationState(p.stateDir, TENANT)).to.equal(undefined);
    await closeRegions(source, target);
  });

  const kills = ['frozen', 'rewrapped', 'copied', 'commit', 'shredded'];
  for (const killAt of kills) {
    it(`resumes after the process is SIGKILLed ${killAt === 'commit' ? 'inside the commit' : `after ${killAt}`}`, async function () {
      this.timeout(60_000);
      const homeFile = path.join(p.dst.dir, 'home');
      const child = spawn(
        process.execPath,
        [
          '--import',
          'tsx',
          WORKER,
          JSON.stringify({
            source: p.src.childOptions(),
            target: p.dst.childOptions(),
            tenant: TENANT,
            stateDir: p.stateDir,
            killAt,
            homeFile,
          }),
        ],
        { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString('utf8')));
      child.stderr.on('data', (d: Buffer) => (err += d.toString('utf8')));
      const exit = await new Promise<NodeJS.Signals | null>((resolve) => {
        child.on('exit', (_code, signal) => {
          resolve(signal);
        });
      });
      expect(exit, `stdout: ${out}\nstderr: ${err}`).to.equal('SIGKILL');
      expect(out).to.not.include('final');
      const home = homeRecorder();
      if (fs.existsSync(homeFile)) {
        home.home = fs.readFileSync(homeFile, 'utf8');
      }
      const { source, target } = await p.open();
      const result = await migrateTenant({
        tenant: TENANT,
        source,
        target,
        stateDir: p.stateDir,
        commit: (x) => home.commit(x),
      });
      expect(result).to.include({ phase: 'done', resumed: true, verifiedRecords: 4 });
      expect(home.home).to.equal('eu-west');
      await closeRegions(source, target);
      await expectOnlyInTarget(p);
    });
  }
});
