/**
 * The owner and lease of a DEK rewrap job: replicas (RegionStores instances on one storage and
 * keyring; on PostgreSQL, one schema prefix) never run the same job at once, and a job whose
 * owner stopped is taken over by another once its lease expired.
 *
 * Who ran each batch is read from the store itself: a trigger (added by the spec) logs the job
 * row's `lease_owner` whenever a batch advances `done`.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { ConflictError, InvalidInputError } from '../../../tenants/index.ts';
import { createLocalKeyProvider, tenantSchemaName } from '../../../tenants/data-plane.ts';
import type {
  ChainedAuditEvent,
  JobInfo,
  OpenRegionStoresOptions,
  RegionStores,
} from '../../../tenants/data-plane.ts';
import {
  asInstance,
  flipCiphertextByte,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
} from './helpers.ts';
import type { Env, RawDb } from './helpers.ts';

const WORKER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'child', 'store-worker.ts');
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const TENANT = 'acme';

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms);
  });

/** Another process on the same storage and keyring (its own key provider instance). */
async function replica(env: Env, extra: Partial<OpenRegionStoresOptions> = {}) {
  const keyProvider = await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region });
  return env.reopen({ keyProvider, ...extra });
}

async function seed(stores: RegionStores, n: number): Promise<void> {
  const s = stores.store(TENANT);
  for (let i = 1; i <= n; i += 10) {
    await Promise.all(
      Array.from({ length: Math.min(10, n - i + 1) }, (_, k) =>
        s.saveInvocation(invocation(`inv-${i + k}`, `m${i + k}`)),
      ),
    );
  }
}

/**
 * A running job nobody runs: rotated by a process that stops at once (its throttle keeps it
 * after the first batch; its close releases the lease).
 */
async function leftRunning(env: Env): Promise<JobInfo> {
  const starter = await replica(env, { rewrap: { scheduledBatchSize: 2, throttleMs: 600_000 } });
  const job = await starter.store(TENANT).keys.rotate();
  await starter.close();
  return job;
}

interface JobLog {
  /** The lease owner of every update that advanced the job's `done`, in order. */
  owners(): Promise<string[]>;
}

/** Logs the job row's lease owner at every batch that advances `done` (a trigger). */
async function logBatches(env: Env, raw: RawDb): Promise<JobLog> {
  if (env.backend === 'sqlite') {
    await raw.exec('CREATE TABLE spec_job_log (n INTEGER PRIMARY KEY, owner TEXT, done INTEGER)');
    await raw.exec(
      `CREATE TRIGGER spec_job_log AFTER UPDATE OF done ON jobs FOR EACH ROW
       WHEN NEW.done <> OLD.done
       BEGIN INSERT INTO spec_job_log (owner, done) VALUES (NEW.lease_owner, NEW.done); END`,
    );
  } else {
    const schema = `"${tenantSchemaName(env.schemaPrefix, TENANT)}"`;
    await raw.exec(
      `CREATE TABLE ${schema}.spec_job_log (n serial PRIMARY KEY, owner text, done integer)`,
    );
    await raw.exec(
      `CREATE FUNCTION ${schema}.spec_job_log() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN
         INSERT INTO ${schema}.spec_job_log (owner, done) VALUES (NEW.lease_owner, NEW.done);
         RETURN NULL;
       END $$`,
    );
    await raw.exec(
      `CREATE TRIGGER spec_job_log AFTER UPDATE ON ${raw.t('jobs')} FOR EACH ROW
       WHEN (NEW.done <> OLD.done) EXECUTE FUNCTION ${schema}.spec_job_log()`,
    );
  }
  return {
    async owners() {
      const rows = await raw.query<{ owner: string | null }>(
        `SELECT owner FROM ${raw.t('spec_job_log')} ORDER BY n`,
      );
      return rows.map((r) => r.owner ?? '(none)');
    },
  };
}

/** `[owner, batches]` runs of consecutive batches by the same owner. */
function runsOf(owners: readonly string[]): Array<[string, number]> {
  const runs: Array<[string, number]> = [];
  for (const o of owners) {
    const last = runs.at(-1);
    if (last?.[0] === o) {
      last[1] += 1;
    } else {
      runs.push([o, 1]);
    }
  }
  return runs;
}

async function events(stores: RegionStores, type: string): Promise<ChainedAuditEvent[]> {
  return (await stores.store(TENANT).audit.list({ limit: 10_000 })).filter((e) => e.type === type);
}

async function expectAllReadable(stores: RegionStores, n: number, version: number) {
  for (let i = 1; i <= n; i += 1) {
    const rec = await stores.store(TENANT).readInvocation(`inv-${i}`);
    expect(rec.keyVersion, `inv-${i}`).to.equal(version);
    expect(rec.secret.trace).to.deep.equal([{ rule: 'r1', matched: `m${i}-trace` }]);
  }
}

async function jobRow(raw: RawDb, id: string) {
  const [row] = await raw.query<{
    status: string;
    lease_owner: string | null;
    lease_until: string | null;
  }>(`SELECT status, lease_owner, lease_until FROM ${raw.t('jobs')} WHERE id = :id`, { id });
  return row;
}

/** A store-worker child (see child/store-worker.ts) and its stdout lines. */
function startWorker(args: object): {
  child: ChildProcess;
  waitFor(pred: (line: string) => boolean): Promise<string>;
  exited: Promise<NodeJS.Signals | null>;
} {
  const child = spawn(process.execPath, ['--import', 'tsx', WORKER, JSON.stringify(args)], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const waiters: Array<{ pred: (l: string) => boolean; resolve: (l: string) => void }> = [];
  let buffered = '';
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString('utf8');
  });
  child.stdout.on('data', (d: Buffer) => {
    buffered += d.toString('utf8');
    for (let i = buffered.indexOf('\n'); i >= 0; i = buffered.indexOf('\n')) {
      const line = buffered.slice(0, i);
      buffered = buffered.slice(i + 1);
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.pred(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }
  });
  const exited = new Promise<NodeJS.Signals | null>((resolve) => {
    child.on('exit', (_code, signal) => {
      resolve(signal);
    });
  });
  return {
    child,
    exited,
    waitFor(pred) {
      const hit = lines.find(pred);
      if (hit !== undefined) {
        return Promise.resolve(hit);
      }
      return Promise.race([
        new Promise<string>((resolve) => waiters.push({ pred, resolve })),
        exited.then(() => {
          throw new Error(`worker exited before the expected line; stderr: ${stderr}`);
        }),
      ]);
    },
  };
}

forEachBackend('tenants/ data plane: rewrap job owner and lease', (backend) => {
  let env: Env;
  let raw: RawDb;
  beforeEach(async () => {
    env = await makeEnv(backend);
    raw = await env.raw(TENANT);
  });
  afterEach(async () => {
    await env.close();
  });

  it('two replicas resuming the same running job: one runs every batch, the job ends once', async function () {
    this.timeout(60_000);
    const N = 120;
    await seed(env.stores, N);
    const job = await leftRunning(env);
    const log = await logBatches(env, raw);
    const pacing = { jobLeaseMs: 5_000, rewrap: { scheduledBatchSize: 2, throttleMs: 30 } };
    const a = await replica(env, pacing);
    const b = await replica(env, pacing);

    const resumed = await Promise.all([a.resumePendingJobs(), b.resumePendingJobs()]);
    expect(resumed.map((r) => r.map((j) => j.id))).to.deep.equal([[job.id], [job.id]]);
    const [doneA, doneB] = await Promise.all([a.waitForJob(job.id), b.waitForJob(job.id)]);
    expect(doneA).to.include({ status: 'done', done: N, total: N });
    expect(doneB).to.include({ status: 'done', done: N, total: N });

    // Every batch after the starter's by one replica, none by the other.
    const runs = runsOf(await log.owners());
    expect(runs).to.have.length(1);
    expect(runs[0]?.[0]).to.be.oneOf([a.jobOwner, b.jobOwner]);
    expect((await events(a, 'key.rewrap')).map((e) => [e.outcome, e.detail])).to.deep.equal([
      ['success', { job: job.id, done: N, total: N, destroyed: '1' }],
    ]);
    expect(await events(a, 'key.rewrap.takeover')).to.deep.equal([]);
    expect(await jobRow(raw, job.id)).to.deep.equal({
      status: 'done',
      lease_owner: null,
      lease_until: null,
    });
    await expectAllReadable(a, N, 2);
    expect((await a.store(TENANT).audit.verify()).ok).to.equal(true);
  });

  it('an owner that dies mid-job: another replica takes it over once its lease expired, and finishes', async function () {
    this.timeout(90_000);
    const N = 200;
    await seed(env.stores, N);
    const job = await leftRunning(env);
    const log = await logBatches(env, raw);
    const child = startWorker({
      mode: 'rewrap',
      env: env.childOptions(),
      tenant: TENANT,
      jobId: job.id,
      scheduledBatchSize: 2,
      throttleMs: 150,
      jobLeaseMs: 800,
    });
    const owner = (await child.waitFor((l) => l.startsWith('owner '))).slice('owner '.length);
    await child.waitFor((l) => /^progress (2[4-9]|[3-9]\d) /.test(l));
    const b = await replica(env, { jobLeaseMs: 800, rewrap: { throttleMs: 0 } });
    await b.resumePendingJobs(); // the child holds it: b watches
    await sleep(1_000); // more than a lease: the child keeps renewing it
    child.child.kill('SIGKILL');
    const killedAt = Date.now();
    expect(await child.exited).to.equal('SIGKILL');

    const done = await b.waitForJob(job.id);
    expect(done).to.include({ status: 'done', done: N, total: N });
    const takeovers = await events(b, 'key.rewrap.takeover');
    expect(takeovers).to.have.length(1);
    const detail = takeovers[0]?.detail ?? {};
    expect(detail).to.include({ job: job.id, from: owner, to: b.jobOwner, total: N });
    expect(Date.parse(takeovers[0]?.at ?? '')).to.be.at.least(killedAt);
    // Not before the dead owner's lease ended (one machine, one clock; the event's time is
    // taken just before the transaction reads the database's).
    expect(Date.parse(takeovers[0]?.at ?? '')).to.be.at.least(
      Date.parse(String(detail.leaseExpiredAt)) - 50,
    );
    // The child's batches, then b's: never one of b's while the child lived.
    const runs = runsOf(await log.owners());
    expect(runs.map(([o]) => o)).to.deep.equal([owner, b.jobOwner]);
    expect(await events(b, 'key.rewrap')).to.have.length(1);
    await expectAllReadable(b, N, 2);
    expect((await b.store(TENANT).audit.verify()).ok).to.equal(true);
  });

  it('a live owner whose throttle is longer than its lease keeps the lease: no takeover', async function () {
    this.timeout(60_000);
    const N = 24;
    await seed(env.stores, N);
    const log = await logBatches(env, raw);
    const a = await replica(env, {
      jobLeaseMs: 300,
      rewrap: { scheduledBatchSize: 2, throttleMs: 700 },
    });
    const b = await replica(env, { jobLeaseMs: 300, rewrap: { throttleMs: 0 } });
    const job = await a.store(TENANT).keys.rotate();
    expect(job.leaseOwner).to.equal(a.jobOwner);
    expect((await b.resumePendingJobs()).map((j) => j.id)).to.deep.equal([job.id]);
    const [doneA, doneB] = await Promise.all([a.waitForJob(job.id), b.waitForJob(job.id)]);
    expect(doneA).to.include({ status: 'done', done: N });
    expect(doneB).to.include({ status: 'done', done: N });
    expect(runsOf(await log.owners())).to.deep.equal([[a.jobOwner, 3]]);
    expect(await events(a, 'key.rewrap.takeover')).to.deep.equal([]);
    await expectAllReadable(b, N, 2);
  });

  it('close() releases the lease: a restarted process resumes the job at once', async function () {
    this.timeout(30_000);
    await seed(env.stores, 20);
    const a = await replica(env, { rewrap: { scheduledBatchSize: 2, throttleMs: 600_000 } });
    const job = await a.store(TENANT).keys.rotate();
    expect((await jobRow(raw, job.id))?.lease_owner).to.equal(a.jobOwner);
    await a.close();
    expect(await jobRow(raw, job.id)).to.deep.include({ lease_owner: null, lease_until: null });
    const restarted = await replica(env); // default lease: 60 s
    const started = Date.now();
    await restarted.resumePendingJobs();
    expect(await restarted.waitForJob(job.id)).to.include({ status: 'done', done: 20 });
    expect(Date.now() - started).to.be.below(10_000);
    expect(await events(restarted, 'key.rewrap.takeover')).to.deep.equal([]);
  });

  /** A running job whose owner is gone: its lease expired long ago. */
  async function orphaned(): Promise<JobInfo> {
    const job = await leftRunning(env);
    await raw.exec(
      `UPDATE ${raw.t('jobs')} SET lease_owner = 'gone-host:1:dead', lease_until = :until
       WHERE id = :id`,
      { id: job.id, until: '2000-01-01T00:00:00.000Z' },
    );
    return job;
  }

  it('reading a job whose owner is gone takes it over here; a live owner’s job is only watched', async function () {
    this.timeout(30_000);
    await seed(env.stores, 20);
    const live = await replica(env, { rewrap: { scheduledBatchSize: 2, throttleMs: 600_000 } });
    const b = await replica(env);
    const running = await live.store(TENANT).keys.rotate();
    const seen = await b.findJob(running.id);
    expect(seen).to.include({ status: 'running', leaseOwner: live.jobOwner });
    expect(Date.parse(seen?.leaseExpiresAt ?? '')).to.be.above(Date.now());
    expect(b.stats().runningJobs).to.equal(0);
    // The live owner's job is superseded by an emergency rotation elsewhere; then one is left.
    expect(
      (await b.waitForJob((await b.store(TENANT).keys.rotate({ emergency: true })).id)).status,
    ).to.equal('done');
    await live.close();

    const job = await orphaned();
    const read = await b.findJob(job.id);
    expect(read).to.include({ status: 'running', leaseOwner: 'gone-host:1:dead' });
    expect(b.stats().runningJobs).to.equal(1); // taken over by the read
    expect(await b.waitForJob(job.id)).to.include({ status: 'done', done: 20 });
    const takeovers = await events(b, 'key.rewrap.takeover');
    expect(takeovers.map((e) => e.detail)).to.deep.equal([
      {
        job: job.id,
        from: 'gone-host:1:dead',
        to: b.jobOwner,
        leaseExpiredAt: '2000-01-01T00:00:00.000Z',
        done: 8,
        total: 20,
      },
    ]);
  });

  it('a scheduled rotation refused while a job runs (409) takes over that job if its owner is gone', async function () {
    this.timeout(30_000);
    await seed(env.stores, 20);
    const b = await replica(env);
    const job = await orphaned();
    const err = await rejection(b.store(TENANT).keys.rotate());
    expect(asInstance(err, ConflictError).message).to.include(job.id);
    expect(b.stats().runningJobs).to.equal(1);
    for (let i = 0; i < 400 && (await jobRow(raw, job.id))?.status === 'running'; i += 1) {
      await sleep(25);
    }
    expect(await jobRow(raw, job.id)).to.deep.equal({
      status: 'done',
      lease_owner: null,
      lease_until: null,
    });
    expect((await events(b, 'key.rewrap.takeover')).map((e) => e.detail?.to)).to.deep.equal([
      b.jobOwner,
    ]);
    await expectAllReadable(b, 20, 2);
  });

  it('shows the owner and lease of a running job; an ended job (superseded, failed, done) has none', async function () {
    this.timeout(30_000);
    await seed(env.stores, 12);
    const a = await replica(env, {
      jobLeaseMs: 10_000,
      rewrap: { scheduledBatchSize: 2, throttleMs: 600_000 },
    });
    const before = Date.now();
    const job = await a.store(TENANT).keys.rotate();
    for (const info of [job, await a.findJob(job.id), (await a.listJobs(TENANT))[0]]) {
      expect(info).to.include({ id: job.id, status: 'running', leaseOwner: a.jobOwner });
      const expires = Date.parse(info?.leaseExpiresAt ?? '');
      expect(expires).to.be.within(before + 9_000, Date.now() + 10_500);
    }
    expect(a.jobOwner).to.match(/^[A-Za-z0-9._-]+:\d+:[0-9a-f]{12}$/);
    // An emergency rotation supersedes it; a tampered record then fails the emergency job.
    const [rec] = await raw.query<{ sealed: string | Uint8Array }>(
      `SELECT sealed FROM ${raw.t('invocations')} WHERE id = 'inv-5'`,
    );
    await raw.exec(`UPDATE ${raw.t('invocations')} SET sealed = :sealed WHERE id = 'inv-5'`, {
      sealed: flipCiphertextByte(rec?.sealed ?? ''),
    });
    const emergency = await a.store(TENANT).keys.rotate({ emergency: true });
    const failed = await a.waitForJob(emergency.id);
    expect(failed.status).to.equal('failed');
    for (const [id, status] of [
      [job.id, 'superseded'],
      [emergency.id, 'failed'],
    ] as const) {
      const info = await a.findJob(id);
      expect(info?.status).to.equal(status);
      expect(info).to.not.have.any.keys('leaseOwner', 'leaseExpiresAt');
      expect(await jobRow(raw, id)).to.deep.equal({ status, lease_owner: null, lease_until: null });
    }
  });

  it('refuses a bad jobLeaseMs', async () => {
    for (const jobLeaseMs of [0, 99, 1.5, 3_600_001, Number.NaN]) {
      const err = await rejection(env.reopen({ jobLeaseMs }));
      expect(asInstance(err, InvalidInputError).field, String(jobLeaseMs)).to.equal('jobLeaseMs');
    }
  });

  it('a store at schema 2 (no lease columns) opens, is upgraded to 3 by two replicas at once, and resumes its job', async function () {
    this.timeout(30_000);
    await seed(env.stores, 20);
    const job = await leftRunning(env);
    await env.stores.close();
    // What the previous version left: the jobs table without the lease columns, schema 2.
    await raw.exec(`ALTER TABLE ${raw.t('jobs')} DROP COLUMN lease_owner`);
    await raw.exec(`ALTER TABLE ${raw.t('jobs')} DROP COLUMN lease_until`);
    await raw.exec(`UPDATE ${raw.t('meta')} SET value = '2' WHERE key = 'schema'`);
    const columns = async () =>
      backend === 'sqlite'
        ? (await raw.query<{ name: string }>(`SELECT name FROM pragma_table_info('jobs')`)).map(
            (c) => c.name,
          )
        : (
            await raw.query<{ column_name: string }>(
              `SELECT column_name FROM information_schema.columns
               WHERE table_schema = :schema AND table_name = 'jobs'`,
              { schema: tenantSchemaName(env.schemaPrefix, TENANT) },
            )
          ).map((c) => c.column_name);
    expect(await columns()).to.not.include('lease_owner');

    const [c, d] = await Promise.all([replica(env), replica(env)]);
    const [statusC, statusD] = await Promise.all([
      c.store(TENANT).keys.status(),
      d.store(TENANT).keys.status(),
    ]);
    expect(statusC.runningJob).to.equal(job.id);
    expect(statusD.runningJob).to.equal(job.id);
    expect(await columns()).to.include.members(['lease_owner', 'lease_until']);
    const [schema] = await raw.query<{ value: string }>(
      `SELECT value FROM ${raw.t('meta')} WHERE key = 'schema'`,
    );
    expect(schema?.value).to.equal('6'); // the current version (3: leases, 4: wrap counts, 5: card suggestions, 6: card rules)
    await Promise.all([c.resumePendingJobs(), d.resumePendingJobs()]);
    expect(await c.waitForJob(job.id)).to.include({ status: 'done', done: 20, total: 20 });
    expect(await events(c, 'key.rewrap')).to.have.length(1);
    await expectAllReadable(d, 20, 2);
  });
});
