/**
 * Per-tenant SMART client ids: each health system registers the card viewer in its own EHR and
 * gets its own client_id. The launch of a tenant sends that id, and the viewer API accepts only
 * id_tokens whose `aud` is the launching tenant's id; CELLCDS_SMART_CLIENT_ID is the default for
 * tenants that registered none.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import sqlite3 from 'sqlite3';
import request from 'supertest';
import type { Browser } from 'playwright-core';
import { openControlPlane } from '../../tenants/index.ts';
import { startSmartServer } from '../helpers/smart-server.ts';
import type { SmartServer } from '../helpers/smart-server.ts';
import { shippedPackRaw, shippedPackVersion } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { hasChromium, launchChromium, startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const DEFAULT_ID = 'cellcds-default-viewer';
const FHIR = {
  a: 'https://fhir.hospital-a.test.example/r4',
  b: 'https://fhir.hospital-b.test.example/r4',
  c: 'https://fhir.hospital-c.test.example/r4',
  shared: 'https://fhir.shared.test.example/r4',
};

async function addTenant(
  u: UiApp,
  id: string,
  issuer: TestIssuer,
  fhirServers: string[],
  smart?: unknown,
  sharedIssuer?: boolean,
): Promise<request.Response> {
  return request(u.handler)
    .post('/admin/tenants')
    .set('authorization', `Bearer ${u.t.adminToken}`)
    .send({
      id,
      name: `Tenant ${id}`,
      region: u.t.deps.config.region,
      issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
      fhirServers,
      ...(smart === undefined ? {} : { smart }),
      ...(sharedIssuer === undefined ? {} : { sharedIssuer }),
    });
}

const launch = (u: UiApp, iss: string, tenant?: string) =>
  request(u.handler).get(
    `/app/launch?iss=${encodeURIComponent(iss)}&launch=abc${tenant === undefined ? '' : `&tenant=${tenant}`}`,
  );
const launchConfig = (u: UiApp, iss: string, tenant?: string) =>
  request(u.handler).get(
    `/app/api/config?iss=${encodeURIComponent(iss)}${tenant === undefined ? '' : `&tenant=${tenant}`}`,
  );

function callBody(fhirServer: string, tenant?: string) {
  return {
    fhirServer,
    ...(tenant === undefined ? {} : { tenant }),
    fhirAuthorization: { access_token: 'at-0123456789', token_type: 'Bearer', patient: 'p1' },
    context: { patientId: 'p1' },
  };
}

describe('card viewer: per-tenant SMART client ids', () => {
  let u: UiApp;
  let noDefault: UiApp;
  /** One EHR authorization server hosting two health systems (the realistic cross-tenant case). */
  let ehr: TestIssuer;
  let ehrC: TestIssuer;

  before(async () => {
    ehr = await TestIssuer.create({ iss: 'https://auth.shared-ehr.test.example' });
    ehrC = await TestIssuer.create({ iss: 'https://auth.ehr-c.test.example' });
    u = await startUiApp({ smartClientId: DEFAULT_ID });
    noDefault = await startUiApp();
    for (const app of [u, noDefault]) {
      expect(
        (await addTenant(app, 'hospital-a', ehr, [FHIR.a], { clientId: 'client-a' })).status,
      ).to.equal(201);
      expect(
        (await addTenant(app, 'hospital-b', ehr, [FHIR.b], { clientId: 'client-b' }, true)).status,
      ).to.equal(201);
      expect((await addTenant(app, 'hospital-c', ehrC, [FHIR.c])).status).to.equal(201);
    }
  });
  after(async () => {
    await u.close();
    await noDefault.close();
  });

  const token = (issuer: TestIssuer, aud: string) =>
    issuer.sign({ aud, sub: 'user-1', fhirUser: 'https://x.example/Practitioner/pr-1' });
  const call = async (app: UiApp, jwt: string, fhirServer: string, tenant?: string) =>
    request(app.handler)
      .post('/app/api/patient-view')
      .set('authorization', `Bearer ${jwt}`)
      .send(callBody(fhirServer, tenant));

  it("shows the tenant's client id in GET /admin/tenants/{id}", async () => {
    const res = await request(u.handler)
      .get('/admin/tenants/hospital-a')
      .set('authorization', `Bearer ${u.t.adminToken}`);
    expect(res.status).to.equal(200);
    expect(res.body.smart).to.deep.equal({ clientId: 'client-a' });
    const c = await request(u.handler)
      .get('/admin/tenants/hospital-c')
      .set('authorization', `Bearer ${u.t.adminToken}`);
    expect(c.body).to.not.have.property('smart');
  });

  it('launches each tenant with its own client id, and the default for a tenant without one', async () => {
    for (const [iss, tenant, clientId] of [
      [FHIR.a, 'hospital-a', 'client-a'],
      [FHIR.b, 'hospital-b', 'client-b'],
      [FHIR.c, 'hospital-c', DEFAULT_ID],
    ] as const) {
      expect((await launch(u, iss)).status, iss).to.equal(200);
      const cfg = await launchConfig(u, iss);
      expect(cfg.status).to.equal(200);
      expect(cfg.body).to.include({ configured: true, clientId, tenant });
    }
  });

  it("accepts only an id_token addressed to the launching tenant's client id", async () => {
    const okA = await call(u, await token(ehr, 'client-a'), FHIR.a);
    expect(okA.status, JSON.stringify(okA.body)).to.equal(200);
    expect(okA.body.tenant).to.equal('hospital-a');
    const okB = await call(u, await token(ehr, 'client-b'), FHIR.b);
    expect(okB.status, JSON.stringify(okB.body)).to.equal(200);
    expect(okB.body.tenant).to.equal('hospital-b');
    const okC = await call(u, await token(ehrC, DEFAULT_ID), FHIR.c);
    expect(okC.status, JSON.stringify(okC.body)).to.equal(200);
    expect(okC.body.tenant).to.equal('hospital-c');
  });

  const refused: Array<[string, string, () => Promise<string>, string, string?]> = [
    [
      "tenant B's id_token used for tenant A's launch",
      'bad_aud',
      () => token(ehr, 'client-b'),
      FHIR.a,
    ],
    [
      "tenant A's id_token used for tenant B's launch",
      'bad_aud',
      () => token(ehr, 'client-a'),
      FHIR.b,
    ],
    [
      "tenant A's id_token with a tenant hint switching to B",
      'bad_tenant',
      () => token(ehr, 'client-a'),
      FHIR.a,
      'hospital-b',
    ],
    [
      'the default client id for a tenant that has its own',
      'bad_aud',
      () => token(ehr, DEFAULT_ID),
      FHIR.a,
    ],
    [
      "tenant A's client id for a tenant on the default",
      'bad_aud',
      () => token(ehrC, 'client-a'),
      FHIR.c,
    ],
  ];
  for (const [name, reason, make, fhirServer, tenant] of refused) {
    it(`refuses ${name} (401 ${reason}, audited)`, async () => {
      const audit = () => u.t.deps.controlPlane.audit.list({ type: 'auth.failure' });
      const before = (await audit()).length;
      const res = await call(u, await make(), fhirServer, tenant);
      expect(res.status, JSON.stringify(res.body)).to.equal(401);
      expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
      expect(res.headers['www-authenticate']).to.equal('Bearer');
      const after = await audit();
      expect(after.length).to.equal(before + 1);
      expect(after.at(-1)?.detail).to.deep.include({ endpoint: '/app/api/patient-view', reason });
    });
  }

  it('with no default: a tenant with its own id launches, one without is refused clearly', async () => {
    expect((await launch(noDefault, FHIR.a)).status).to.equal(200);
    expect((await launchConfig(noDefault, FHIR.a)).body).to.include({
      configured: true,
      clientId: 'client-a',
    });
    const ok = await call(noDefault, await token(ehr, 'client-a'), FHIR.a);
    expect(ok.status, JSON.stringify(ok.body)).to.equal(200);

    const page = await launch(noDefault, FHIR.c);
    expect(page.status).to.equal(400);
    expect(page.type).to.equal('text/html');
    expect(page.text).to.include('no SMART client id');
    expect(page.text).to.not.include('launch.mjs');
    expect((await launchConfig(noDefault, FHIR.c)).body).to.deep.equal({ configured: false });
    const res = await call(noDefault, await token(ehrC, DEFAULT_ID), FHIR.c);
    expect(res.status).to.equal(401);
    expect(res.body.error).to.equal('invalid_token');
    // The old unparameterised config still answers "not configured" (no default).
    expect((await request(noDefault.handler).get('/app/api/config')).body).to.deep.equal({
      configured: false,
    });
  });

  it('refuses an ambiguous launch (one FHIR server, two client ids) unless it names the tenant', async () => {
    const d = await TestIssuer.create({ iss: 'https://auth.d.test.example' });
    const e = await TestIssuer.create({ iss: 'https://auth.e.test.example' });
    expect(
      (await addTenant(u, 'hospital-d', d, [FHIR.shared], { clientId: 'client-d' })).status,
    ).to.equal(201);
    expect(
      (await addTenant(u, 'hospital-e', e, [FHIR.shared], { clientId: 'client-e' })).status,
    ).to.equal(201);
    const page = await launch(u, FHIR.shared);
    expect(page.status).to.equal(400);
    expect(page.text).to.include('tenant=');
    expect((await launchConfig(u, FHIR.shared)).status).to.equal(400);
    expect((await launch(u, FHIR.shared, 'hospital-e')).status).to.equal(200);
    expect((await launchConfig(u, FHIR.shared, 'hospital-e')).body).to.include({
      configured: true,
      clientId: 'client-e',
      tenant: 'hospital-e',
    });
    // A hint naming a tenant that does not allowlist this FHIR server: not a launch target.
    expect((await launch(u, FHIR.shared, 'hospital-a')).status).to.equal(400);
    expect((await launchConfig(u, FHIR.shared, 'hospital-a')).status).to.equal(400);
  });

  it('changes, audits and resets a client id through PATCH /admin/tenants/{id}', async () => {
    const patch = (body: unknown) =>
      request(u.handler)
        .patch('/admin/tenants/hospital-c')
        .set('authorization', `Bearer ${u.t.adminToken}`)
        .send(body as object);
    const set = await patch({ smart: { clientId: 'client-c' } });
    expect(set.status, JSON.stringify(set.body)).to.equal(200);
    expect(set.body.smart).to.deep.equal({ clientId: 'client-c' });
    expect((await launchConfig(u, FHIR.c)).body).to.include({ clientId: 'client-c' });
    expect((await call(u, await token(ehrC, 'client-c'), FHIR.c)).status).to.equal(200);
    expect((await call(u, await token(ehrC, DEFAULT_ID), FHIR.c)).status).to.equal(401);
    const events = await u.t.deps.controlPlane.audit.list({
      tenant: 'hospital-c',
      type: 'admin.tenant.update',
    });
    expect(events.map((e) => e.detail)).to.deep.include({ fields: 'smart' });

    const reset = await patch({ smart: null });
    expect(reset.status).to.equal(200);
    expect(reset.body).to.not.have.property('smart');
    expect((await launchConfig(u, FHIR.c)).body).to.include({ clientId: DEFAULT_ID });
    expect((await call(u, await token(ehrC, DEFAULT_ID), FHIR.c)).status).to.equal(200);
  });

  const badIds: Array<[string, unknown, string]> = [
    ['an empty client id', { clientId: '' }, 'smart.clientId'],
    ['a client id with a space', { clientId: 'client a' }, 'smart.clientId'],
    ['a client id with a control character', { clientId: 'client\u0000a' }, 'smart.clientId'],
    ['a non-ASCII client id', { clientId: 'clïent' }, 'smart.clientId'],
    ['a 256-character client id', { clientId: 'x'.repeat(256) }, 'smart.clientId'],
    ['a numeric client id', { clientId: 42 }, 'smart.clientId'],
    ['a missing client id', {}, 'smart.clientId'],
    ['an unknown smart field', { clientId: 'ok', secret: 'x' }, 'smart.secret'],
    ['smart as a string', 'client-x', 'smart'],
    ['smart as an array', ['client-x'], 'smart'],
  ];
  for (const [name, smart, field] of badIds) {
    it(`refuses ${name} on POST and PATCH (400 naming ${field})`, async () => {
      const i = await TestIssuer.create({ iss: 'https://auth.bad.test.example' });
      const created = await addTenant(u, 'hospital-bad', i, [], smart);
      expect(created.status, JSON.stringify(created.body)).to.equal(400);
      expect(created.body.error).to.equal('invalid_request');
      expect(created.body.field).to.equal(field);
      const patched = await request(u.handler)
        .patch('/admin/tenants/hospital-a')
        .set('authorization', `Bearer ${u.t.adminToken}`)
        .send({ smart });
      expect(patched.status).to.equal(400);
      expect(patched.body.field).to.equal(field);
    });
  }

  it('accepts a 255-character client id of visible ASCII (UUIDs, URLs)', async () => {
    for (const clientId of [
      'x'.repeat(255),
      '2f1b6a5e-6c1d-4a0e-9d55-4b8c0f1f2e3a',
      'https://app.cellcds.example/client',
    ]) {
      const res = await request(u.handler)
        .patch('/admin/tenants/hospital-b')
        .set('authorization', `Bearer ${u.t.adminToken}`)
        .send({ smart: { clientId } });
      expect(res.status, clientId).to.equal(200);
      expect(res.body.smart.clientId).to.equal(clientId);
    }
    await request(u.handler)
      .patch('/admin/tenants/hospital-b')
      .set('authorization', `Bearer ${u.t.adminToken}`)
      .send({ smart: { clientId: 'client-b' } });
  });
});

describe('control plane: SMART client id column upgrade', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-smart-col-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('adds the smart column to an existing SQLite control plane on open, keeping its tenants', async () => {
    const file = path.join(dir, 'control.sqlite');
    const issuer = await TestIssuer.create({ iss: 'https://auth.old.test.example' });
    const cp = await openControlPlane({ storage: file });
    await cp.tenants.create({
      id: 'old-tenant',
      name: 'Old',
      region: 'local',
      issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
      fhirServers: [FHIR.a],
    });
    await cp.close();
    // Make it a control plane of before this change: no `smart` column.
    const db = new sqlite3.Database(file);
    await new Promise<void>((resolve, reject) => {
      db.exec('ALTER TABLE tenants DROP COLUMN smart', (err) => {
        db.close();
        if (err) {
          reject(err);
        } else {
          resolve();
        }
      });
    });
    const reopened = await openControlPlane({ storage: file });
    try {
      const old = await reopened.tenants.get('old-tenant');
      expect(old).to.not.have.property('smart');
      const updated = await reopened.tenants.update('old-tenant', { smart: { clientId: 'c-1' } });
      expect(updated.smart).to.deep.equal({ clientId: 'c-1' });
      expect((await reopened.tenants.get('old-tenant')).smart).to.deep.equal({ clientId: 'c-1' });
    } finally {
      await reopened.close();
    }
  });

  const pgUrl = process.env.CELLCDS_TEST_PG_URL;
  (pgUrl ? it : it.skip)(
    'adds the smart column to an existing PostgreSQL control plane on open',
    async () => {
      const url = pgUrl ?? '';
      const schema = `cellcds_smart_${crypto.randomBytes(4).toString('hex')}`;
      const root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 1 } });
      try {
        const issuer = await TestIssuer.create({ iss: 'https://auth.old-pg.test.example' });
        const cp = await openControlPlane({ postgresUrl: url, schema });
        await cp.tenants.create({
          id: 'old-tenant',
          name: 'Old',
          region: 'local',
          issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
          fhirServers: [FHIR.a],
        });
        await cp.close();
        await root.query(`ALTER TABLE "${schema}".tenants DROP COLUMN smart`);
        const reopened = await openControlPlane({ postgresUrl: url, schema });
        try {
          expect(await reopened.tenants.get('old-tenant')).to.not.have.property('smart');
          await reopened.tenants.update('old-tenant', { smart: { clientId: 'c-pg' } });
          expect((await reopened.tenants.get('old-tenant')).smart).to.deep.equal({
            clientId: 'c-pg',
          });
          expect(await reopened.tenants.smartLaunchTargets()).to.deep.equal([
            { tenant: 'old-tenant', fhirServers: [FHIR.a], clientId: 'c-pg' },
          ]);
        } finally {
          await reopened.close();
        }
      } finally {
        await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
        await root.close();
      }
    },
  );
});

describe('cellcds tenant add --smart-client-id', function () {
  this.timeout(120_000);
  let work: string;
  before(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-smart-cli-'));
  });
  after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  const run = (args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: {
        ...process.env,
        CELLCDS_DATA_DIR: path.join(work, 'data'),
        CELLCDS_LOG_LEVEL: 'silent',
      },
      encoding: 'utf8',
      timeout: 90_000,
    });

  it('registers the client id, and refuses a bad one naming the field', async () => {
    const issuer = await TestIssuer.create({ iss: 'https://auth.cli.test.example' });
    const jwks = path.join(work, 'jwks.json');
    fs.writeFileSync(jwks, JSON.stringify(issuer.publicJwks()));
    const base = ['tenant', 'add', '--name', 'CLI', '--iss', issuer.iss, '--jwks-file', jwks];
    const ok = run([...base, '--id', 'cli-a', '--smart-client-id', 'client-cli-a']);
    expect(ok.status, ok.stderr).to.equal(0);
    expect(JSON.parse(ok.stdout).smart).to.deep.equal({ clientId: 'client-cli-a' });
    const bad = run([...base, '--id', 'cli-b', '--smart-client-id', 'has space']);
    // Invalid input is a usage error (exit 2), like every other CLI usage error.
    expect(bad.status).to.equal(2);
    expect(bad.stderr).to.include('smart.clientId');
  });
});

describe("card viewer in Chromium: a launch with the tenant's own client id", function () {
  this.timeout(90_000);
  const OWN_ID = 'hospital-own-viewer';
  let u: UiApp;
  let smart: SmartServer;
  let browser: Browser;
  const cleanup: Array<() => Promise<void>> = [];

  before(async function () {
    if (!hasChromium()) {
      this.skip();
    }
    u = await startUiApp({ smartClientId: DEFAULT_ID });
    cleanup.push(() => u.close());
    smart = await startSmartServer({
      clientId: OWN_ID,
      redirectUris: [`${u.base}/app/`],
      patientFile: 'Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json',
    });
    cleanup.push(() => smart.close());
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    const created = await addTenant(u, 'hospital-own', smart.signer, [smart.fhirBaseUrl], {
      clientId: OWN_ID,
    });
    expect(created.status, JSON.stringify(created.body)).to.equal(201);
    const sub = await request(u.handler)
      .put('/admin/tenants/hospital-own/subscriptions')
      .set('authorization', `Bearer ${u.t.adminToken}`)
      .send([{ pack: 'medication-safety', version: shippedPackVersion() }]);
    expect(sub.status, JSON.stringify(sub.body)).to.equal(200);
    browser = await launchChromium();
    cleanup.push(() => browser.close());
  });
  after(async () => {
    for (const close of cleanup.reverse()) {
      await close();
    }
  });

  it("sends the tenant's client id, shows its cards, and refuses a session bound to another client id", async () => {
    const page = await browser.newPage();
    try {
      const before = smart.authorizeRequests.length;
      await page.goto(smart.launchUrl(`${u.base}/app/launch`));
      await page.locator('.card').first().waitFor();
      expect(smart.authorizeRequests[before]).to.include({ client_id: OWN_ID });
      // The page's own storage, read and written by script text (the spec has no DOM types).
      const KEY = "sessionStorage.getItem('cellcds.app.launch')";
      const launch = await page.evaluate<Record<string, unknown>>(`JSON.parse(${KEY} ?? '{}')`);
      expect(launch).to.deep.include({ clientId: OWN_ID, tenant: 'hospital-own' });
      // The same tab, its launch record switched to another tenant's client id: no call.
      const calls = smart.fhirRequests.length;
      const swapped = JSON.stringify({ ...launch, clientId: 'client-b', tenant: 'hospital-b' });
      await page.evaluate(
        `sessionStorage.setItem('cellcds.app.launch', ${JSON.stringify(swapped)})`,
      );
      await page.reload();
      await page.locator('#app-status.error').waitFor();
      expect(await page.locator('#app-status').textContent()).to.include(
        'does not match the launch',
      );
      expect(await page.locator('.card').count()).to.equal(0);
      const serverSide = smart.fhirRequests
        .slice(calls)
        .filter((r) => !(r.userAgent ?? '').includes('Chrome'));
      expect(serverSide).to.deep.equal([]);
    } finally {
      await page.close();
    }
  });

  it('shows the refusal when the EHR signs the id_token for another client id', async () => {
    const page = await browser.newPage();
    // The default client id: this tenant registered its own, so the default is not its.
    smart.idTokenClaims.aud = DEFAULT_ID;
    try {
      await page.goto(smart.launchUrl(`${u.base}/app/launch`));
      await page.locator('#app-status.error').waitFor();
      expect(await page.locator('#app-status').textContent()).to.include(
        'cellcds refused this launch',
      );
      const audit = await u.t.deps.controlPlane.audit.list({ type: 'auth.failure' });
      expect(audit.at(-1)?.detail).to.deep.include({
        reason: 'bad_aud',
        endpoint: '/app/api/patient-view',
      });
    } finally {
      delete smart.idTokenClaims.aud;
      await page.close();
    }
  });
});
