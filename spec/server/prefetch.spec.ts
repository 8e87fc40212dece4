import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, shippedPackRaw, type TestApp } from '../helpers/test-app.ts';
import { startFhirServer, type TestFhirServer } from '../helpers/fhir-server.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const DEREK = 'Derek_Becker_3c7d3369-55b5-420b-83d3-c5dda319b9c9.json';

/** Prefetch over real HTTP: the EHR's FHIR server is a local Express app serving Synthea. */
describe('prefetch through the service (HTTP)', function () {
  this.timeout(60_000);
  let t: TestApp;
  let fhir: TestFhirServer;
  let other: TestFhirServer;
  let issuer: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/medication-safety-patient-view`;

  before(async () => {
    fhir = await startFhirServer({ patientFile: DEREK, token: 'access-token-1234567890-secret' });
    other = await startFhirServer({ patientFile: DEREK, token: 'access-token-1234567890-secret' });
    t = await buildTestApp();
    // Derek Becker's record ends on 2020-05-11: evaluate as of that day.
    t.deps.now = () => new Date('2020-05-11T23:59:59Z');
    const up = await t.uploadPack(shippedPackRaw());
    expect(up.status, JSON.stringify(up.body)).to.equal(201);
    issuer = await t.addTenant('hosp', {
      subscriptions: [{ pack: 'medication-safety', version: up.body.version as string }],
      fhirServers: [fhir.baseUrl],
    });
  });
  after(async () => {
    await t.close();
    await fhir.close();
    await other.close();
  });

  const call = async (body: Record<string, unknown>) =>
    request(t.app)
      .post('/cds-services/medication-safety-patient-view')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(body);

  const body = (fhirServer: string | undefined, withAuth = true): Record<string, unknown> => ({
    hook: 'patient-view',
    hookInstance: crypto.randomUUID(),
    ...(fhirServer ? { fhirServer } : {}),
    ...(withAuth
      ? {
          fhirAuthorization: {
            access_token: 'access-token-1234567890-secret',
            token_type: 'Bearer',
            expires_in: 300,
            scope: 'patient/*.read',
            subject: 'cellcds',
          },
        }
      : {}),
    context: { userId: 'Practitioner/example', patientId: fhir.record.patientId },
  });

  it('fetches every missing key from the allowlisted FHIR server with the bearer token, and answers with cards', async () => {
    fhir.requests.length = 0;
    const res = await call(body(fhir.baseUrl));
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(fhir.requests.length).to.be.greaterThan(0);
    for (const r of fhir.requests) {
      expect(r.authorization).to.equal('Bearer access-token-1234567890-secret');
    }
    expect(res.body.cards.map((c: { summary: string }) => c.summary).join(' ')).to.match(
      /[Ww]arfarin/,
    );
  });

  it('uses what the EHR sent and fetches only the rest', async () => {
    fhir.requests.length = 0;
    const patient = fhir.record.resources.find((r) => r.resourceType === 'Patient');
    const res = await call({ ...body(fhir.baseUrl), prefetch: { patient } });
    expect(res.status).to.equal(200);
    expect(fhir.requests.some((r) => r.url.includes('/Patient/'))).to.equal(false);
    expect(fhir.requests.length).to.be.greaterThan(0);
  });

  it('refuses an unlisted fhirServer with 412 and an OperationOutcome, making no request', async () => {
    other.requests.length = 0;
    const res = await call(body(other.baseUrl));
    expect(res.status).to.equal(412);
    expect(res.body.resourceType).to.equal('OperationOutcome');
    expect(other.requests).to.have.length(0);
  });

  it('answers 412 when data is missing and there is no fhirServer to fetch it from', async () => {
    const res = await call(body(undefined, false));
    expect(res.status).to.equal(412);
    expect(res.body.resourceType).to.equal('OperationOutcome');
  });

  it('times out a slow FHIR server with 412', async () => {
    fhir.behaviour.delayMs = 5000;
    try {
      const started = Date.now();
      const res = await call(body(fhir.baseUrl));
      expect(res.status).to.equal(412);
      expect(Date.now() - started).to.be.below(4500);
    } finally {
      fhir.behaviour.delayMs = 0;
    }
  });

  it('answers a call without an encounter when the service also asks for the encounter (null, no request, no 412)', async () => {
    // encounterId is optional in patient-view: a chart opened outside an encounter.
    const pack = structuredClone(shippedPackRaw()) as {
      version: string;
      services: Array<{ id: string; prefetch: Record<string, string> }>;
    };
    pack.version = '1.0.1-encounter';
    const service = pack.services.find((s) => s.id === 'medication-safety-patient-view');
    service!.prefetch['encounter'] = 'Encounter/{{context.encounterId}}';
    const up = await t.uploadPack(pack);
    expect(up.status, JSON.stringify(up.body)).to.equal(201);
    const other = await t.addTenant('hosp-encounter', {
      subscriptions: [{ pack: 'medication-safety', version: '1.0.1-encounter' }],
      fhirServers: [fhir.baseUrl],
    });
    fhir.requests.length = 0;
    const res = await request(t.app)
      .post('/cds-services/medication-safety-patient-view')
      .set('authorization', `Bearer ${await other.sign({ aud: url })}`)
      .send(body(fhir.baseUrl));
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.cards.map((c: { summary: string }) => c.summary).join(' ')).to.match(
      /[Ww]arfarin/,
    );
    expect(fhir.requests.some((r) => r.url.includes('/Encounter'))).to.equal(false);
  });

  it('never writes the access token or patient data to the log', () => {
    const log = t.logLines.join('\n');
    expect(log).to.not.include('access-token-1234567890-secret');
    expect(log).to.not.include('Becker');
  });
});
