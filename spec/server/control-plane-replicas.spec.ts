/**
 * Scale-out of the control plane (docs/operations.md, "Scale-out"): replicas given the same
 * CELLCDS_CONTROL_PLANE_URL share tenants, issuers, packs and the audit log, each with its own
 * in-process state, and see each other's changes on their next call without a restart. A bad
 * URL stops the boot naming the setting, never printing the credentials.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { ConfigError, loadConfig } from '../../server/config.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { freePort, runCliAsync } from '../helpers/processes.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { startTcpProxy } from '../tenants/data-plane/tcp-proxy.ts';
import type { TcpProxy } from '../tenants/data-plane/tcp-proxy.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;

describe('scale-out: replicas share the control plane (PostgreSQL)', function () {
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  this.timeout(120_000);
  const schema = `cellcds_cpr_${crypto.randomBytes(4).toString('hex')}`;
  const env = { CELLCDS_CONTROL_PLANE_URL: PG_URL, CELLCDS_CONTROL_PLANE_SCHEMA: schema };
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  let a: TestApp;
  let b: TestApp;
  let issuer: TestIssuer;

  const call = (app: TestApp, token: string) =>
    request(app.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
  const admin = (app: TestApp) => ({
    post: (p: string) => request(app.app).post(p).set('authorization', `Bearer ${app.adminToken}`),
    patch: (p: string) =>
      request(app.app).patch(p).set('authorization', `Bearer ${app.adminToken}`),
    get: (p: string) => request(app.app).get(p).set('authorization', `Bearer ${app.adminToken}`),
  });

  before(async () => {
    issuer = await TestIssuer.create({ iss: `https://ehr-cpr-${schema}.example` });
    // Two replicas start at once on an empty schema: it is created once.
    [a, b] = await Promise.all([buildTestApp(env), buildTestApp(env)]);
  });
  after(async () => {
    await Promise.all([a.close(), b.close()]);
    const root = new Sequelize(PG_URL, { dialect: 'postgres', logging: false });
    await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await root.close();
  });

  it("serves on replica B a tenant registered through A's admin API, and follows its suspension", async () => {
    // One catalog and one registry: the pack and the tenant are registered through A only.
    expect((await a.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    await a.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }], issuer });
    expect((await call(b, await issuer.sign({ aud: url }))).status).to.equal(200);

    expect((await admin(a).post('/admin/tenants/hosp/suspend')).status).to.equal(200);
    const refused = await call(b, await issuer.sign({ aud: url }));
    expect(refused.status).to.be.oneOf([401, 403]);

    expect((await admin(b).post('/admin/tenants/hosp/resume')).status).to.equal(200);
    expect((await call(a, await issuer.sign({ aud: url }))).status).to.equal(200);
    expect((await call(b, await issuer.sign({ aud: url }))).status).to.equal(200);
  });

  it('follows a key set rotated on the other replica: old key refused, new key served', async () => {
    expect((await call(b, await issuer.sign({ aud: url }))).status).to.equal(200);
    const rotated = await TestIssuer.create({ iss: issuer.iss });
    const res = await admin(a)
      .patch('/admin/tenants/hosp')
      .send({ issuers: [{ iss: issuer.iss, jwks: rotated.publicJwks() }] });
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect((await call(b, await issuer.sign({ aud: url }))).status).to.equal(401);
    expect((await call(b, await rotated.sign({ aud: url }))).status).to.equal(200);
    issuer = rotated;
  });

  it('keeps one verifiable audit chain when both replicas record at once', async () => {
    const writes = await Promise.all(
      Array.from({ length: 10 }, (_, k) =>
        admin(k % 2 ? a : b)
          .post('/admin/tokens')
          .send({ role: 'auditor', tenant: 'hosp', label: `t${String(k)}` }),
      ),
    );
    expect(writes.map((r) => r.status)).to.deep.equal(writes.map(() => 201));
    for (const app of [a, b]) {
      const verify = await admin(app).get('/admin/audit/verify');
      expect(verify.status).to.equal(200);
      expect(verify.body).to.include({ ok: true });
    }
    const { events } = (await admin(b).get('/admin/audit')).body as {
      events: Array<{ seq: number; type: string }>;
    };
    expect(events.map((e) => e.seq)).to.deep.equal(events.map((_, k) => k + 1));
    expect(events.filter((e) => e.type === 'admin.token.issue')).to.have.length(10);
  });
});

/**
 * The control plane's PostgreSQL stops answering under a running replica (a throwaway TCP proxy
 * in front of the test database: spec/tenants/data-plane/tcp-proxy.ts): hook calls fail closed
 * with a retryable 503 (the tenant's token cannot be checked against its registration), not a
 * 401 that would read as a bad token nor a 500; /readyz names the part; once the database
 * answers again the same replica serves, with no restart.
 */
describe('scale-out: the control plane database stops answering (PostgreSQL)', function () {
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  this.timeout(120_000);
  const schema = `cellcds_cpo_${crypto.randomBytes(4).toString('hex')}`;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  let proxy: TcpProxy;
  let app: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    proxy = await startTcpProxy(PG_URL);
    issuer = await TestIssuer.create({ iss: `https://ehr-cpo-${schema}.example` });
    app = await buildTestApp({
      CELLCDS_CONTROL_PLANE_URL: proxy.url,
      CELLCDS_CONTROL_PLANE_SCHEMA: schema,
      // Bounded waits, so the refused calls answer within a couple of seconds.
      CELLCDS_PG_STATEMENT_TIMEOUT_MS: '1000',
      CELLCDS_PG_ACQUIRE_TIMEOUT_MS: '1000',
    });
    expect((await app.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    await app.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }], issuer });
  });
  after(async () => {
    proxy.resume();
    await app.close();
    await proxy.close();
    const root = new Sequelize(PG_URL, { dialect: 'postgres', logging: false });
    await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await root.close();
  });

  const call = async () =>
    request(app.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());

  it('answers 503 while it does not answer (not 401, not 500), and serves again after', async () => {
    expect((await call()).status).to.equal(200);

    proxy.stall();
    proxy.dropAll();
    const refused = await call();
    expect(refused.status, JSON.stringify(refused.body)).to.equal(503);
    const ready = await request(app.app).get('/readyz');
    expect(ready.status).to.equal(503);
    expect(ready.body).to.have.property('controlPlane', 'down');

    proxy.resume();
    let status = 0;
    for (let i = 0; i < 20 && status !== 200; i += 1) {
      status = (await call()).status;
      if (status !== 200) {
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    }
    expect(status).to.equal(200);
  });
});

describe('configuration: CELLCDS_CONTROL_PLANE_URL', function () {
  this.timeout(120_000);

  it('is unset by default: the SQLite file in the data directory', () => {
    const c = loadConfig({ CELLCDS_DATA_DIR: '/srv/cellcds' });
    expect(c.controlPlane).to.deep.equal({
      kind: 'sqlite',
      file: '/srv/cellcds/control.sqlite',
      schema: 'cellcds_control',
    });
  });

  it('takes a postgres:// or postgresql:// URL and a schema (default cellcds_control)', () => {
    const c = loadConfig({ CELLCDS_CONTROL_PLANE_URL: 'postgresql://u:p@db:5432/cellcds' });
    expect(c.controlPlane).to.deep.equal({
      kind: 'postgres',
      url: 'postgresql://u:p@db:5432/cellcds',
      schema: 'cellcds_control',
    });
    expect(
      loadConfig({
        CELLCDS_CONTROL_PLANE_URL: 'postgres://db/cellcds',
        CELLCDS_CONTROL_PLANE_SCHEMA: 'cp_eu',
      }).controlPlane,
    ).to.include({ schema: 'cp_eu' });
  });

  const bad: Array<[string, Record<string, string>, string]> = [
    ['a mysql URL', { CELLCDS_CONTROL_PLANE_URL: 'mysql://u:s3cret@db/x' }, 'URL'],
    ['a URL without a host', { CELLCDS_CONTROL_PLANE_URL: 'postgres:///s3cret' }, 'URL'],
    ['not a URL', { CELLCDS_CONTROL_PLANE_URL: 'u:s3cret@db' }, 'URL'],
    [
      'a schema with capitals',
      { CELLCDS_CONTROL_PLANE_URL: 'postgres://db/x', CELLCDS_CONTROL_PLANE_SCHEMA: 'Cp' },
      'SCHEMA',
    ],
    [
      'a schema with a quote',
      {
        CELLCDS_CONTROL_PLANE_URL: 'postgres://db/x',
        CELLCDS_CONTROL_PLANE_SCHEMA: 'x"; drop',
      },
      'SCHEMA',
    ],
  ];
  for (const [name, env, setting] of bad) {
    it(`stops the boot on ${name}, naming the setting without its value`, () => {
      let err: unknown;
      try {
        loadConfig(env);
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(ConfigError);
      expect(String(err)).to.include(`CELLCDS_CONTROL_PLANE_${setting}`);
      expect(String(err)).to.not.include('s3cret');
    });
  }

  describe('cellcds serve', () => {
    let dir: string;
    let port: number;
    const env = (extra: Record<string, string>) => ({
      ...process.env,
      PORT: String(port),
      CELLCDS_DATA_DIR: path.join(dir, 'data'),
      CELLCDS_ADMIN_TOKEN: `op-${'b'.repeat(40)}`,
      CELLCDS_PUBLIC_URL: `http://127.0.0.1:${String(port)}`,
      CELLCDS_LOG_LEVEL: 'info',
      CELLCDS_SEED_DEMO: 'false',
      ...extra,
    });
    beforeEach(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cpboot-'));
      port = await freePort();
    });
    afterEach(() => {
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('refuses a bad URL at boot, naming the setting, credentials not printed', async () => {
      const r = await runCliAsync(
        ['serve'],
        env({ CELLCDS_CONTROL_PLANE_URL: 'mysql://cellcds:s3cret@127.0.0.1/db' }),
      );
      expect(r.status, r.stderr).to.equal(2); // a configuration error
      expect(r.stderr).to.include('CELLCDS_CONTROL_PLANE_URL');
      expect(r.stdout + r.stderr).to.not.include('s3cret');
    });

    it('stops when PostgreSQL refuses, naming the control plane and the setting', async () => {
      const closed = await freePort(); // nothing listens there
      const r = await runCliAsync(
        ['serve'],
        env({
          CELLCDS_CONTROL_PLANE_URL: `postgres://cellcds:s3cret@127.0.0.1:${String(closed)}/db`,
        }),
      );
      expect(r.status, r.stderr).to.equal(1);
      expect(r.stderr).to.match(
        /cellcds: control plane \(PostgreSQL schema cellcds_control\) failed at boot: .*\(check CELLCDS_CONTROL_PLANE_URL\)/,
      );
      expect(r.stdout + r.stderr).to.not.include('s3cret');
    });
  });
});
