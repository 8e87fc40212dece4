import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

describe('admin API', () => {
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
  });
  after(async () => t.close());

  describe('rule packs', () => {
    it('stores a new version (201), is idempotent for the same content (200), refuses other content under it (409)', async () => {
      const first = await t.uploadPack(tinyPack('p1'));
      expect(first.status).to.equal(201);
      expect(first.body).to.have.keys('id', 'version', 'hash');
      expect(first.body.hash).to.match(/^[0-9a-f]{64}$/);
      const again = await t.uploadPack(tinyPack('p1'));
      expect(again.status).to.equal(200);
      expect(again.body.hash).to.equal(first.body.hash);
      const changed = await t.uploadPack(tinyPack('p1', '1.0.0', 'Another summary'));
      expect(changed.status).to.equal(409);
      expect(changed.body.error).to.equal('conflict');
    });

    it('accepts YAML', async () => {
      const res = await op(request(t.app).post('/admin/rule-packs'))
        .set('content-type', 'application/yaml')
        .send(YAML.stringify(tinyPack('p-yaml')));
      expect(res.status).to.equal(201);
      expect(res.body.id).to.equal('p-yaml');
    });

    it('answers a bad pack with 422 listing every problem with its path, and stores nothing', async () => {
      const bad = tinyPack('p-bad');
      const rules = bad.rules as Array<Record<string, unknown>>;
      rules[0]!.when = '%draftOrders.entry.existss()';
      rules[1]!.service = 'no-such-service';
      const res = await t.uploadPack(bad);
      expect(res.status).to.equal(422);
      expect(res.body.error).to.equal('unprocessable');
      const paths = res.body.problems.map((p: { path: string }) => p.path);
      expect(paths).to.include('rules[0].when');
      expect(paths).to.include('rules[1].service');
      const list = await op(request(t.app).get('/admin/rule-packs'));
      expect(list.body.packs.map((p: { id: string }) => p.id)).to.not.include('p-bad');
    });

    it('lists packs and returns a version', async () => {
      const list = await op(request(t.app).get('/admin/rule-packs'));
      expect(list.status).to.equal(200);
      const one = await op(request(t.app).get('/admin/rule-packs/p1/versions/1.0.0'));
      expect(one.status).to.equal(200);
      expect(one.body.pack.id).to.equal('p1');
      expect((await op(request(t.app).get('/admin/rule-packs/p1/versions/9.9.9'))).status).to.equal(
        404,
      );
    });

    it('lets a rule-author upload but not create tenants', async () => {
      const tok = (await op(request(t.app).post('/admin/tokens')).send({ role: 'rule-author' }))
        .body.token as string;
      const up = await request(t.app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${tok}`)
        .send(tinyPack('p-author'));
      expect(up.status).to.equal(201);
      const ten = await request(t.app)
        .post('/admin/tenants')
        .set('authorization', `Bearer ${tok}`)
        .send({ id: 'x-tenant', name: 'x', region: 'local', issuers: [] });
      expect(ten.status).to.equal(403);
    });
  });

  describe('tenants and subscriptions', () => {
    let issuer: TestIssuer;
    before(async () => {
      issuer = await TestIssuer.create({ iss: 'https://ehr-admin-spec.example' });
    });

    it('creates a tenant (201), refuses a duplicate (409) and bad fields (400 naming the field)', async () => {
      const body = {
        id: 'hosp-1',
        name: 'Hospital One',
        region: 'local',
        issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
        fhirServers: ['https://fhir.hosp1.example/r4'],
      };
      const res = await op(request(t.app).post('/admin/tenants')).send(body);
      expect(res.status).to.equal(201);
      expect(res.body).to.include({ id: 'hosp-1', status: 'active', region: 'local' });
      expect((await op(request(t.app).post('/admin/tenants')).send(body)).status).to.equal(409);
      const bad = await op(request(t.app).post('/admin/tenants')).send({ ...body, id: 'Bad Id!' });
      expect(bad.status).to.equal(400);
      expect(bad.body.field).to.equal('id');
      const priv = await op(request(t.app).post('/admin/tenants')).send({
        ...body,
        id: 'hosp-priv',
        issuers: [
          {
            iss: 'https://x.example',
            jwks: { keys: [{ kty: 'EC', crv: 'P-384', kid: 'k', x: 'a', y: 'b', d: 'secret' }] },
          },
        ],
      });
      expect(priv.status).to.equal(400);
    });

    it('patches, suspends and resumes a tenant', async () => {
      const p = await op(request(t.app).patch('/admin/tenants/hosp-1')).send({
        name: 'Hospital 1',
      });
      expect(p.status).to.equal(200);
      expect(p.body.name).to.equal('Hospital 1');
      expect((await op(request(t.app).post('/admin/tenants/hosp-1/suspend'))).body.status).to.equal(
        'suspended',
      );
      expect((await op(request(t.app).post('/admin/tenants/hosp-1/resume'))).body.status).to.equal(
        'active',
      );
      expect((await op(request(t.app).get('/admin/tenants/nope'))).status).to.equal(404);
    });

    it('subscribes to a pinned version, refusing unknown packs', async () => {
      const ok = await op(request(t.app).put('/admin/tenants/hosp-1/subscriptions')).send([
        { pack: 'p1', version: '1.0.0' },
      ]);
      expect(ok.status).to.equal(200);
      expect(ok.body.subscriptions).to.deep.equal([{ pack: 'p1', version: '1.0.0' }]);
      const bad = await op(request(t.app).put('/admin/tenants/hosp-1/subscriptions')).send([
        { pack: 'p1', version: '7.0.0' },
      ]);
      expect(bad.status).to.be.oneOf([400, 404, 422]);
    });

    it('routes a canary share to a newer version, and rollback is repointing', async () => {
      expect((await t.uploadPack(tinyPack('canary', '1.0.0', 'Version one'))).status).to.equal(201);
      expect((await t.uploadPack(tinyPack('canary', '1.1.0', 'Version two'))).status).to.equal(201);
      const setSubs = (subs: object) =>
        op(request(t.app).put('/admin/tenants/hosp-1/subscriptions')).send(subs);
      expect(
        (
          await setSubs([
            { pack: 'canary', version: '1.0.0', canary: { version: '1.1.0', percent: 50 } },
          ])
        ).status,
      ).to.equal(200);
      const url = `${PUBLIC_URL}/cds-services/canary-order-sign`;
      const seen: Record<string, number> = {};
      for (let i = 0; i < 40; i++) {
        const res = await request(t.app)
          .post('/cds-services/canary-order-sign')
          .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
          .send(warfarinNsaidRequest());
        expect(res.status).to.equal(200);
        const s = res.body.cards[0].summary as string;
        seen[s] = (seen[s] ?? 0) + 1;
      }
      expect(seen['Version one']).to.be.greaterThan(5);
      expect(seen['Version two']).to.be.greaterThan(5);
      // The same hookInstance always goes to the same version.
      const fixed = crypto.randomUUID();
      const summaries = new Set<string>();
      for (let i = 0; i < 4; i++) {
        const res = await request(t.app)
          .post('/cds-services/canary-order-sign')
          .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
          .send(warfarinNsaidRequest(fixed));
        summaries.add(res.body.cards[0].summary as string);
      }
      expect(summaries.size).to.equal(1);
      // Rollback: repoint to 1.0.0 only; the next call uses it.
      expect((await setSubs([{ pack: 'canary', version: '1.0.0' }])).status).to.equal(200);
      for (let i = 0; i < 5; i++) {
        const res = await request(t.app)
          .post('/cds-services/canary-order-sign')
          .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
          .send(warfarinNsaidRequest());
        expect(res.body.cards[0].summary).to.equal('Version one');
      }
    });
  });

  describe('operator tokens', () => {
    it('returns a token once, stores only its hash, and revocation takes effect', async () => {
      const issued = await op(request(t.app).post('/admin/tokens')).send({
        role: 'platform-operator',
        label: 'spec',
      });
      expect(issued.status).to.equal(201);
      // The one-time token (and every admin answer, refusals too) must not be cached anywhere.
      expect(issued.headers['cache-control']).to.equal('no-store');
      expect((await request(t.app).get('/admin/tenants')).headers['cache-control']).to.equal(
        'no-store',
      );
      const token = issued.body.token as string;
      expect(
        (await request(t.app).get('/admin/tenants').set('authorization', `Bearer ${token}`)).status,
      ).to.equal(200);
      const list = await op(request(t.app).get('/admin/tokens'));
      expect(JSON.stringify(list.body)).to.not.include(token);
      for (const file of ['control.sqlite', 'control.sqlite-wal']) {
        const p = path.join(t.dataDir, file);
        if (fs.existsSync(p)) {
          expect(fs.readFileSync(p).includes(Buffer.from(token)), file).to.equal(false);
        }
      }
      expect(
        (await op(request(t.app).delete(`/admin/tokens/${issued.body.id as string}`))).status,
      ).to.equal(204);
      expect(
        (await request(t.app).get('/admin/tenants').set('authorization', `Bearer ${token}`)).status,
      ).to.equal(401);
    });

    it('refuses a tenant-scoped token without a tenant, and an unknown role', async () => {
      expect(
        (await op(request(t.app).post('/admin/tokens')).send({ role: 'tenant-admin' })).status,
      ).to.equal(400);
      expect(
        (await op(request(t.app).post('/admin/tokens')).send({ role: 'root' })).status,
      ).to.equal(400);
    });
  });

  describe('audit', () => {
    it('records admin actions in the audit log, without tokens', async () => {
      const res = await op(request(t.app).get('/admin/audit'));
      expect(res.status).to.equal(200);
      const types = new Set(res.body.events.map((e: { type: string }) => e.type));
      for (const type of [
        'admin.pack.upload',
        'admin.tenant.create',
        'admin.tenant.subscriptions',
        'admin.token.issue',
        'admin.token.revoke',
      ]) {
        expect(types, type).to.include(type);
      }
      expect(JSON.stringify(res.body)).to.not.include(t.adminToken);
    });
  });
});
