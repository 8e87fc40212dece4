import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';
import type { Deps } from '../../server/context.ts';
import { recordAuthFailure } from '../../server/guards.ts';
import { AuthError } from '../../tenants/index.ts';
import type { AuditEvent, StoredAuditEvent } from '../../tenants/index.ts';

/**
 * The path of a CDS Hooks call is the client's text. Whatever it is, a refusal stays a refusal
 * (401, 421) and is audited with a bounded detail: a long or odd service id must not make the
 * audit store reject the event (which used to turn a 401 into a 400 and leave no trace, so
 * tokens could be guessed through long paths unaudited).
 */
const LONG_ID = 'x'.repeat(1100);
/** A bounded detail: every string short, none carrying the client's id. */
function expectBounded(event: StoredAuditEvent | undefined): void {
  expect(event, 'an audit event').to.not.equal(undefined);
  for (const v of Object.values(event?.detail ?? {})) {
    if (typeof v === 'string') {
      expect(v.length).to.be.at.most(200);
      expect(v).to.not.include('xxxxxxxxxx');
    }
  }
}

describe('server/ audit details of refused requests are bounded', function () {
  this.timeout(60_000);

  describe('auth failures', () => {
    let t: TestApp;
    before(async () => {
      t = await buildTestApp();
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    });
    after(async () => {
      await t.close();
    });

    const lastAuthFailure = async () =>
      (await t.deps.controlPlane.audit.list({ type: 'auth.failure' })).at(-1);

    const paths: Array<[string, string, string]> = [
      ['a 1,100-character service id', `/cds-services/${LONG_ID}`, '/cds-services/:id'],
      [
        'a 1,100-character service id on feedback',
        `/cds-services/${LONG_ID}/feedback`,
        '/cds-services/:id/feedback',
      ],
      [
        'a service id with control and non-ASCII characters',
        `/cds-services/${encodeURIComponent('Ärger\n"injected": true')}`,
        '/cds-services/:id',
      ],
    ];
    for (const [name, url, endpoint] of paths) {
      it(`answers 401 to a garbage token on ${name}, and audits it with a bounded endpoint`, async () => {
        const before = (await t.deps.controlPlane.audit.list({ type: 'auth.failure' })).length;
        const res = await request(t.app)
          .post(url)
          .set('authorization', 'Bearer garbage')
          .send(patientViewRequest('Nobody'));
        expect(res.status, JSON.stringify(res.body)).to.equal(401);
        expect(res.headers['www-authenticate']).to.equal('Bearer');
        expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
        const events = await t.deps.controlPlane.audit.list({ type: 'auth.failure' });
        expect(events.length).to.equal(before + 1);
        const event = events.at(-1);
        expectBounded(event);
        expect(event?.detail).to.include({ reason: 'malformed', endpoint });
        expect(event?.detail?.idLength).to.be.a('number');
      });
    }

    it('keeps a well-formed service id in the audited endpoint (control)', async () => {
      const res = await request(t.app)
        .post('/cds-services/tiny-patient-view')
        .set('authorization', 'Bearer garbage')
        .send(patientViewRequest('Nobody'));
      expect(res.status).to.equal(401);
      const event = await lastAuthFailure();
      expect(event?.detail).to.include({ endpoint: '/cds-services/tiny-patient-view' });
      expect(event?.detail).to.not.have.property('idLength');
    });

    it('still answers 401 to an unknown admin token when the audit write fails', async () => {
      const auditor = t.deps.failureAudit;
      const original = auditor.record.bind(auditor);
      auditor.record = () => Promise.reject(new Error('disk full'));
      const logBefore = t.logLines.length;
      try {
        const res = await request(t.app)
          .get('/admin/tenants')
          .set('authorization', 'Bearer unknown-admin-token-value');
        expect(res.status, JSON.stringify(res.body)).to.equal(401);
      } finally {
        auditor.record = original;
      }
      const lines = t.logLines.slice(logBefore).join('\n');
      expect(lines).to.include('refusal not audited');
      expect(lines).to.not.include('unknown-admin-token-value');
    });

    it('still answers 401 when the audit write fails, and logs that without the token', async () => {
      const auditor = t.deps.failureAudit;
      const original = auditor.record.bind(auditor);
      auditor.record = () => Promise.reject(new Error('disk full'));
      const logBefore = t.logLines.length;
      try {
        const res = await request(t.app)
          .post('/cds-services/tiny-patient-view')
          .set('authorization', 'Bearer garbage-secret-token-value')
          .send(patientViewRequest('Nobody'));
        expect(res.status, JSON.stringify(res.body)).to.equal(401);
        expect(res.headers['www-authenticate']).to.equal('Bearer');
        expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
      } finally {
        auditor.record = original;
      }
      const lines = t.logLines.slice(logBefore).join('\n');
      expect(lines).to.include('refusal not audited');
      expect(lines).to.include('auth.failure');
      expect(lines).to.not.include('garbage-secret-token-value');
      expect(lines).to.not.include('disk full'); // the store's own text may echo the event
      const metrics = await request(t.app).get('/metrics');
      expect(metrics.text).to.match(
        /cellcds_audit_write_failures_total\{[^}]*event="auth\.failure"[^}]*\} 1/,
      );
    });
  });

  describe('misdirected calls (residency)', () => {
    const URLS = { 'us-east': 'https://us-east.cds.test', 'eu-west': 'https://eu-west.cds.test' };
    type RegionId = keyof typeof URLS;
    let root: string;
    const planes = {} as Record<RegionId, TestApp>;
    let euIssuer: TestIssuer;

    before(async () => {
      root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-audit-bounds-'));
      const file = path.join(root, 'regions.yaml');
      fs.writeFileSync(
        file,
        YAML.stringify({
          regions: (Object.keys(URLS) as RegionId[]).map((id) => ({
            id,
            jurisdiction: id.startsWith('eu') ? 'EU' : 'US',
            publicUrl: URLS[id],
            storage: { dataDir: `data/${id}` },
            backupDir: `backups/${id}`,
            keyProvider: { kind: 'local-keyring', dir: `keys/${id}` },
            failover: [],
          })),
        }),
      );
      for (const id of Object.keys(URLS) as RegionId[]) {
        planes[id] = await buildTestApp({
          CELLCDS_DATA_DIR: root,
          CELLCDS_REGIONS_FILE: file,
          CELLCDS_REGION: id,
        });
      }
      euIssuer = await planes['eu-west'].addTenant('eu-hospital');
    });
    after(async () => {
      for (const p of Object.values(planes)) {
        await p.close();
      }
      fs.rmSync(root, { recursive: true, force: true });
    });

    /** The EU tenant's valid token, for `id` on the US plane (which may not serve it). */
    const misdirected = async (id: string) =>
      request(planes['us-east'].app)
        .post(`/cds-services/${id}`)
        .set(
          'authorization',
          `Bearer ${await euIssuer.sign({ aud: `${URLS['us-east']}/cds-services/${id}` })}`,
        )
        .send(patientViewRequest('Nobody'));
    const misdirectedEvents = () =>
      planes['us-east'].deps.controlPlane.audit.list({
        tenant: 'eu-hospital',
        type: 'residency.misdirected',
      });

    it('answers 421 to a misdirected call on a 1,100-character service id, and audits it bounded', async () => {
      const before = (await misdirectedEvents()).length;
      const res = await misdirected(LONG_ID);
      expect(res.status, JSON.stringify(res.body)).to.equal(421);
      expect(res.body.error).to.equal('misdirected');
      const events = await misdirectedEvents();
      expect(events.length).to.equal(before + 1);
      expectBounded(events.at(-1));
      expect(events.at(-1)?.detail).to.include({
        region: 'us-east',
        endpoint: '/cds-services/:id',
        idLength: 1100,
      });
    });

    it('still answers 421 when the audit write fails, and logs that without the tenant', async () => {
      const audit = planes['us-east'].deps.controlPlane.audit;
      const original = audit.record.bind(audit);
      audit.record = (_event: AuditEvent) => Promise.reject(new Error('disk full'));
      const logBefore = planes['us-east'].logLines.length;
      try {
        const res = await misdirected('tiny-patient-view');
        expect(res.status, JSON.stringify(res.body)).to.equal(421);
        expect(res.body.error).to.equal('misdirected');
      } finally {
        audit.record = original;
      }
      const lines = planes['us-east'].logLines.slice(logBefore).join('\n');
      expect(lines).to.include('refusal not audited');
      expect(lines).to.include('residency.misdirected');
      expect(lines).to.not.include('eu-hospital');
    });
  });

  it("audits a caller's oversized or odd endpoint as a fixed marker with its length", async () => {
    const written: AuditEvent[] = [];
    const deps = {
      metrics: { authFailure: () => undefined },
      failureAudit: {
        record: (event: AuditEvent) => {
          written.push(event);
          return Promise.resolve();
        },
      },
    } as unknown as Deps;
    for (const endpoint of [`/app/${LONG_ID}`, '/app/a b\n', '']) {
      const refusal = recordAuthFailure(deps, new AuthError('malformed'), 'app', {
        endpoint,
        requestId: 'r-1',
      });
      await refusal.then(
        () => expect.fail('rethrows'),
        (err: unknown) => expect(err).to.be.instanceOf(AuthError),
      );
      expect(written.at(-1)?.detail).to.deep.equal({
        reason: 'malformed',
        endpoint: '(unnamed)',
        endpointLength: endpoint.length,
        requestId: 'r-1',
      });
    }
  });
});
