/**
 * A tenant's retention period (`retention: { recordDays }`): validated and settable through the
 * admin API (POST and PATCH) and the CLI (`tenant add --retention-days`, `tenant retention`),
 * shown by `tenant show`/`list`; records past it purged by the server periodically (one
 * tenant's failure does not stop the others) and on demand by `cellcds records purge`
 * (`--dry-run` counts). SQLite, and PostgreSQL with CELLCDS_TEST_PG_URL.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { buildDeps } from '../../server/bootstrap.ts';
import { loadConfig } from '../../server/config.ts';
import { createLogger } from '../../server/logger.ts';
import { tenantSchemaName } from '../../tenants/data-plane.ts';
import type { NewInvocation, TenantStore } from '../../tenants/data-plane.ts';
import { createSpecDatabase, regionEnv, type SpecDatabase } from '../helpers/pg-region.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const backends = PG_URL ? (['sqlite', 'postgres'] as const) : (['sqlite'] as const);
const DAY = 86_400_000;

function record(id: string, time: Date): NewInvocation {
  return {
    id,
    time,
    service: 'svc',
    hook: 'order-sign',
    hookInstance: `hi-${id}`,
    pack: { id: 'p', version: '1.0.0', hash: 'a'.repeat(64) },
    cardUuids: [`card-${id}`],
    suggestionUuids: [],
    secret: { context: { patient: 'PHI-x' }, prefetch: {}, cards: [], trace: [] },
  };
}

/** Two records `days` days old and one of now. */
async function seed(store: TenantStore, now: Date, days: number): Promise<void> {
  await store.saveInvocation(record('old-1', new Date(now.getTime() - days * DAY)));
  await store.saveInvocation(record('old-2', new Date(now.getTime() - days * DAY - 1000)));
  await store.saveInvocation(record('new-1', now));
  await store.saveFeedback(
    [{ card: 'card-old-1', outcome: 'accepted', outcomeTimestamp: now.toISOString() }],
    { service: 'svc' },
  );
}

async function until<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const found = await probe();
    if (found !== undefined) {
      return found;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

describe('server: CELLCDS_RECORD_PURGE_INTERVAL_MS', () => {
  it('defaults to an hour, takes 0 (never), refuses anything else outside 0..1 day naming it', () => {
    expect(loadConfig({}).recordPurgeIntervalMs).to.equal(3_600_000);
    expect(loadConfig({ CELLCDS_RECORD_PURGE_INTERVAL_MS: '0' }).recordPurgeIntervalMs).to.equal(0);
    for (const bad of ['-1', '86400001', '1.5', 'hourly']) {
      expect(() => loadConfig({ CELLCDS_RECORD_PURGE_INTERVAL_MS: bad })).to.throw(
        /CELLCDS_RECORD_PURGE_INTERVAL_MS/,
      );
    }
  });
});

describe('server: tenant retention setting (admin API)', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const body = (id: string, extra: Record<string, unknown>) => ({
    id,
    name: `Tenant ${id}`,
    region: 'local',
    issuers: [{ iss: `https://ehr-${id}.test.example`, jwks: issuer.publicJwks() }],
    ...extra,
  });

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false', CELLCDS_RECORD_PURGE_INTERVAL_MS: '0' });
    issuer = await TestIssuer.create({ iss: 'https://ehr-ret.test.example' });
  });
  after(async () => t.close());

  const bad: Array<[string, Record<string, unknown>, string]> = [
    ['a flat retentionDays', { retentionDays: 30 }, 'retentionDays'],
    ['a number for the object', { retention: 30 }, 'retention'],
    ['zero days', { retention: { recordDays: 0 } }, 'retention.recordDays'],
    ['negative days', { retention: { recordDays: -5 } }, 'retention.recordDays'],
    ['a fraction of a day', { retention: { recordDays: 1.5 } }, 'retention.recordDays'],
    ['a string', { retention: { recordDays: '30' } }, 'retention.recordDays'],
    ['more than ten years', { retention: { recordDays: 3654 } }, 'retention.recordDays'],
    ['no days', { retention: {} }, 'retention.recordDays'],
    ['an unknown part', { retention: { recordDays: 30, hours: 2 } }, 'retention.hours'],
  ];
  for (const [name, extra, field] of bad) {
    it(`refuses ${name} with 400 naming ${field}`, async () => {
      const res = await op(request(t.app).post('/admin/tenants')).send(body('ret-bad', extra));
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body.error).to.equal('invalid_request');
      expect(JSON.stringify(res.body)).to.include(field);
      const patch = await op(request(t.app).patch('/admin/tenants/ret-ok')).send(extra);
      expect(patch.status, JSON.stringify(patch.body)).to.equal(400);
      expect(JSON.stringify(patch.body)).to.include(field);
    });
  }

  before(async () => {
    const res = await op(request(t.app).post('/admin/tenants')).send(body('ret-ok', {}));
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
  });

  it('sets it at registration, shows it, changes it by PATCH and removes it with null', async () => {
    const res = await op(request(t.app).post('/admin/tenants')).send(
      body('ret-30', { retention: { recordDays: 30 } }),
    );
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
    expect(res.body.retention).to.deep.equal({ recordDays: 30 });
    expect((await op(request(t.app).get('/admin/tenants/ret-30'))).body.retention).to.deep.equal({
      recordDays: 30,
    });
    const none = await op(request(t.app).get('/admin/tenants/ret-ok'));
    expect(none.body).to.not.have.property('retention');
    const patched = await op(request(t.app).patch('/admin/tenants/ret-30')).send({
      retention: { recordDays: 3653 },
    });
    expect(patched.status, JSON.stringify(patched.body)).to.equal(200);
    expect(patched.body.retention).to.deep.equal({ recordDays: 3653 });
    const removed = await op(request(t.app).patch('/admin/tenants/ret-30')).send({
      retention: null,
    });
    expect(removed.status).to.equal(200);
    expect(removed.body).to.not.have.property('retention');
    const listed = await op(request(t.app).get('/admin/tenants'));
    expect(JSON.stringify(listed.body)).to.include('ret-30');
    // Audited in the control plane: the period set at registration, each change.
    const audit = await op(request(t.app).get('/admin/audit?tenant=ret-30'));
    const events = audit.body.events as Array<{ type: string; detail?: Record<string, unknown> }>;
    expect(events.find((e) => e.type === 'admin.tenant.create')?.detail).to.deep.include({
      retentionDays: 30,
    });
    const updates = events.filter((e) => e.type === 'admin.tenant.update').map((e) => e.detail);
    expect(updates).to.deep.include.members([
      { fields: 'retention', retentionDays: 3653 },
      { fields: 'retention', retention: 'forever' },
    ]);
  });
});

for (const backend of backends) {
  describe(`server: periodic retention purge [${backend}]`, function () {
    this.timeout(90_000);
    let t: TestApp;
    let dir: string;
    let db: SpecDatabase | undefined;

    before(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-retention-'));
      const env: Record<string, string> = {
        CELLCDS_SEED_DEMO: 'false',
        CELLCDS_RECORD_PURGE_INTERVAL_MS: '100',
      };
      if (backend === 'postgres') {
        db = await createSpecDatabase('retention');
        Object.assign(env, regionEnv(dir, db.url));
      }
      t = await buildTestApp(env);
    });
    after(async () => {
      await t.close();
      await db?.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** Breaks a tenant's store under the server: its purge fails on every pass. */
    async function breakStore(tenant: string): Promise<void> {
      const raw =
        backend === 'sqlite'
          ? new Sequelize({
              dialect: 'sqlite',
              storage: path.join(t.dataDir, 'local', `${tenant}.sqlite`),
              logging: false,
            })
          : new Sequelize(db?.url ?? '', { dialect: 'postgres', logging: false });
      const table =
        backend === 'sqlite'
          ? '"invocation_heads"'
          : `"${tenantSchemaName('cellcds_t_', tenant)}"."invocation_heads"`;
      try {
        await raw.query(`DROP TABLE ${table}`);
      } finally {
        await raw.close();
      }
    }

    it('purges each tenant past its period, logs a failing tenant and goes on with the others', async () => {
      await t.addTenant('a-broken');
      await t.addTenant('b-kept');
      await t.addTenant('c-forever');
      const now = new Date();
      for (const id of ['a-broken', 'b-kept', 'c-forever']) {
        await seed(t.deps.stores.store(id), now, 8);
      }
      await breakStore('a-broken');
      // The passes (every 100 ms) find the periods from now on.
      for (const id of ['a-broken', 'b-kept']) {
        const res = await request(t.app)
          .patch(`/admin/tenants/${id}`)
          .set('authorization', `Bearer ${t.adminToken}`)
          .send({ retention: { recordDays: 7 } });
        expect(res.status, JSON.stringify(res.body)).to.equal(200);
      }

      const kept = t.deps.stores.store('b-kept');
      const event = await until('b-kept purged', async () =>
        (await kept.audit.list({ limit: 10_000 })).find((e) => e.type === 'records.purged'),
      );
      expect(event.actor).to.equal('system');
      expect(event.detail).to.deep.include({ invocations: 2, feedback: 1, retentionDays: 7 });
      expect((await kept.listInvocations()).map((i) => i.id)).to.deep.equal(['new-1']);
      expect((await kept.audit.verify()).ok).to.equal(true);
      const verified = await request(t.app)
        .get('/admin/tenants/b-kept/audit/verify')
        .set('authorization', `Bearer ${t.adminToken}`);
      expect(verified.status, JSON.stringify(verified.body)).to.equal(200);
      expect(verified.body.ok).to.equal(true);

      // The broken tenant came first, failed, was logged (no PHI), and did not stop b-kept.
      const failed = await until('the failure logged', () =>
        Promise.resolve(
          t.logLines.find((l) => l.includes('record purge failed for a tenant')) ?? undefined,
        ),
      );
      expect(JSON.parse(failed)).to.deep.include({ tenant: 'a-broken' });
      expect(failed).to.not.include('PHI');
      const purgedLine = t.logLines.find((l) => l.includes('records purged (retention)'));
      expect(purgedLine && JSON.parse(purgedLine)).to.deep.include({
        tenant: 'b-kept',
        invocations: 2,
        feedback: 1,
      });

      // Counted for the on-call: what was purged, and each failed tenant purge.
      const metrics = (await request(t.app).get('/metrics')).text;
      expect(metrics).to.match(
        /cellcds_records_purged_total\{kind="invocation",region="[^"]+"\} 2\b/,
      );
      expect(metrics).to.match(
        /cellcds_records_purged_total\{kind="feedback",region="[^"]+"\} 1\b/,
      );
      expect(metrics).to.match(/cellcds_record_purge_failures_total\{region="[^"]+"\} [1-9]/);

      // No retention: kept forever.
      const forever = t.deps.stores.store('c-forever');
      expect(await forever.listInvocations()).to.have.length(3);
      expect(
        (await forever.audit.list({ limit: 10_000 })).filter((e) => e.type === 'records.purged'),
      ).to.have.length(0);
    });

    it('purges a suspended tenant, but defers one whose region migration is in progress until it ends', async () => {
      const as = (req: request.Test) => req.set('authorization', `Bearer ${t.adminToken}`);
      const setUp = async (id: string) => {
        await t.addTenant(id);
        await seed(t.deps.stores.store(id), new Date(), 8);
        expect((await as(request(t.app).post(`/admin/tenants/${id}/suspend`))).status).to.equal(
          200,
        );
      };
      await setUp('d-suspended');
      await setUp('e-migrating');
      // As `cellcds migrate` records it (server/migrate.ts) after suspending the tenant.
      const migration = (type: string) =>
        t.deps.controlPlane.audit.record({
          type,
          outcome: 'success',
          tenant: 'e-migrating',
          actor: 'platform-operator:cli',
          detail: { from: 'local', to: 'elsewhere' },
        });
      await migration('migration.started');
      for (const id of ['e-migrating', 'd-suspended']) {
        const res = await as(request(t.app).patch(`/admin/tenants/${id}`)).send({
          retention: { recordDays: 7 },
        });
        expect(res.status, JSON.stringify(res.body)).to.equal(200);
      }
      // A suspended tenant is purged as an active one (retention is not paused by a suspension).
      const suspended = t.deps.stores.store('d-suspended');
      const event = await until('d-suspended purged', async () =>
        (await suspended.audit.list({ limit: 10_000 })).find((e) => e.type === 'records.purged'),
      );
      expect(event.detail).to.deep.include({ invocations: 2, feedback: 1, retentionDays: 7 });

      // The pass that purged it saw the migrating tenant too (its period was set first): left
      // unchanged, with a warn line saying why.
      const migrating = t.deps.stores.store('e-migrating');
      const deferred = await until('the deferral logged', () =>
        Promise.resolve(
          t.logLines.find(
            (l) => l.includes('record purge deferred') && l.includes('"e-migrating"'),
          ) ?? undefined,
        ),
      );
      expect(JSON.parse(deferred)).to.deep.include({ tenant: 'e-migrating', retentionDays: 7 });
      expect(await migrating.listInvocations()).to.have.length(3);

      // The migration ends (here it failed: the tenant stays suspended): purged at the next pass.
      await migration('migration.failed');
      const purged = await until('e-migrating purged once its migration ended', async () =>
        (await migrating.audit.list({ limit: 10_000 })).find((e) => e.type === 'records.purged'),
      );
      expect(purged.detail).to.deep.include({ invocations: 2, feedback: 1, retentionDays: 7 });
      expect((await migrating.listInvocations()).map((i) => i.id)).to.deep.equal(['new-1']);
    });
  });
}

describe('cellcds CLI: retention setting and records purge', function () {
  this.timeout(180_000);
  let work: string;
  let dataDir: string;
  let jwks: string;

  const run = (args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: {
        ...process.env,
        CELLCDS_DATA_DIR: dataDir,
        CELLCDS_LOG_LEVEL: 'silent',
        CELLCDS_SEED_DEMO: 'false',
      },
      encoding: 'utf8',
      timeout: 90_000,
    });

  const openDeps = () =>
    buildDeps(
      loadConfig({
        CELLCDS_DATA_DIR: dataDir,
        CELLCDS_SEED_DEMO: 'false',
        CELLCDS_RECORD_PURGE_INTERVAL_MS: '0',
      }),
      createLogger({ level: 'silent' }),
    );

  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-retention-cli-'));
    dataDir = path.join(work, 'data');
    jwks = path.join(work, 'jwks.json');
    const issuer = await TestIssuer.create({ iss: 'https://ehr-cli-ret.test.example' });
    fs.writeFileSync(jwks, JSON.stringify(issuer.publicJwks()));
  });
  after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('sets the period, shows it, purges with --dry-run first, then for real', async () => {
    const add = (days: string) =>
      run([
        'tenant',
        'add',
        '--id',
        'cli-ret',
        '--name',
        'Hospital',
        '--iss',
        'https://ehr-cli-ret.test.example',
        '--jwks-file',
        jwks,
        '--retention-days',
        days,
      ]);
    const bad = add('thirty');
    expect(bad.status, bad.stderr).to.equal(2);
    expect(bad.stderr).to.include('retention.recordDays');
    const ok = add('30');
    expect(ok.status, ok.stderr).to.equal(0);
    expect(JSON.parse(ok.stdout).retention).to.deep.equal({ recordDays: 30 });
    const changed = run(['tenant', 'retention', 'cli-ret', '--days', '10']);
    expect(changed.status, changed.stderr).to.equal(0);
    expect(run(['tenant', 'list']).stdout).to.include('retention:10d');

    const now = new Date();
    const deps = await openDeps();
    try {
      await seed(deps.stores.store('cli-ret'), now, 11);
    } finally {
      await deps.close();
    }

    const dry = run(['records', 'purge', '--tenant', 'cli-ret', '--dry-run']);
    expect(dry.status, dry.stderr).to.equal(0);
    expect(JSON.parse(dry.stdout)).to.deep.include({ dryRun: true, invocations: 2, feedback: 1 });
    const real = run(['records', 'purge', '--tenant', 'cli-ret', '--batch-size', '1']);
    expect(real.status, real.stderr).to.equal(0);
    expect(JSON.parse(real.stdout)).to.deep.include({
      dryRun: false,
      invocations: 2,
      feedback: 1,
      batches: 2,
    });

    const after = await openDeps();
    try {
      const store = after.stores.store('cli-ret');
      expect((await store.listInvocations()).map((i) => i.id)).to.deep.equal(['new-1']);
      const events = (await store.audit.list({ limit: 10_000 })).filter(
        (e) => e.type === 'records.purged',
      );
      expect(events).to.have.length(1);
      expect(events[0]?.detail).to.deep.include({ invocations: 2, retentionDays: 10 });
      // The local operator, written as every other actor is (role:tokenId).
      expect(events[0]?.actor).to.equal('platform-operator:cli');
      expect((await store.audit.verify()).ok).to.equal(true);
    } finally {
      await after.close();
    }

    // Without a period there is nothing to purge to: refused (exit 2), nothing deleted.
    const forever = run(['tenant', 'retention', 'cli-ret', '--forever']);
    expect(forever.status, forever.stderr).to.equal(0);
    const none = run(['records', 'purge', '--tenant', 'cli-ret']);
    expect(none.status).to.equal(2);
    expect(none.stderr).to.include('no retention period');
  });
});
