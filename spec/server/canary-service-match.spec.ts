/**
 * A canary version stands in for the pinned one only where it serves the same hook with the
 * same prefetch templates (review 5, finding 1): the call was parsed and its prefetch fetched
 * by the pinned version's service, so a canary expecting another hook or other prefetch would
 * silently see the wrong data.
 */
import { expect } from 'chai';
import request from 'supertest';
import { canaryBucket } from '../../rules/index.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const PATIENT = 'Patient/{{context.patientId}}';
const LABS = 'Observation?patient={{context.patientId}}';

/** Pack `cp` at `version`: service `cp-svc` with `hook` and `prefetch`; its card names the version. */
function cpPack(
  version: string,
  hook: string,
  prefetch: Record<string, string>,
  extraService = true,
): Record<string, unknown> {
  return {
    id: 'cp',
    version,
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [
      { id: 'cp-svc', hook, description: 'd', prefetch },
      ...(extraService
        ? [
            {
              id: 'cp-other',
              hook: 'patient-view',
              description: 'd',
              prefetch: { patient: PATIENT },
            },
          ]
        : []),
    ],
    rules: [
      {
        id: 'always',
        service: 'cp-svc',
        when: 'true',
        card: { summary: `from ${version}`, indicator: 'info', source: { label: 'x' } },
      },
      {
        id: 'never',
        service: extraService ? 'cp-other' : 'cp-svc',
        // Never true for these calls (a constant `false` is refused at upload).
        when: "%context.patientId = 'no-such-patient'",
        card: { summary: 'never', indicator: 'info', source: { label: 'x' } },
      },
    ],
  };
}

describe('canary: same hook and prefetch as the pinned version', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const setSubs = (subs: object) =>
    op(request(t.app).put('/admin/tenants/cp-tenant/subscriptions')).send(subs);
  // The largest canary share (MAX_CANARY_PERCENT): the calls below use a hookInstance in it.
  const withCanary = (version: string) => [
    { pack: 'cp', version: '1.0.0', canary: { version, percent: 50 } },
  ];
  /** A hookInstance whose calls a 50 % canary of pack cp takes. */
  const inCanary = (() => {
    for (let i = 0; ; i++) {
      const id = `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`;
      if (canaryBucket('cp', id) < 5000) {
        return id;
      }
    }
  })();

  before(async () => {
    t = await buildTestApp();
    const packs = [
      cpPack('1.0.0', 'patient-view', { patient: PATIENT }),
      // Same hook and prefetch, other content: a canary may be anything else.
      cpPack('1.0.1', 'patient-view', { patient: PATIENT }),
      // Another hook and another prefetch (the reviewer's case).
      cpPack('1.1.0', 'order-sign', { patient: PATIENT, labs: LABS }),
      // Same hook, one more prefetch key.
      cpPack('1.2.0', 'patient-view', { patient: PATIENT, labs: LABS }),
      // Same hook and keys, another template.
      cpPack('1.3.0', 'patient-view', { patient: 'Patient?_id={{context.patientId}}' }),
      // Without cp-other at all: calls of cp-other stay on the pinned version.
      cpPack('1.4.0', 'patient-view', { patient: PATIENT }, false),
    ];
    for (const p of packs) {
      const res = await t.uploadPack(p);
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    }
    issuer = await t.addTenant('cp-tenant');
  });
  after(async () => t.close());

  const call = async () => {
    const url = `${PUBLIC_URL}/cds-services/cp-svc`;
    return request(t.app)
      .post('/cds-services/cp-svc')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send({ ...patientViewRequest(), hookInstance: inCanary });
  };

  const refused: Array<[string, string, RegExp]> = [
    ['another hook and prefetch', '1.1.0', /service 'cp-svc'.*hook order-sign, not patient-view/],
    ['one more prefetch key', '1.2.0', /service 'cp-svc'.*prefetch 'labs'/],
    ['another prefetch template', '1.3.0', /service 'cp-svc'.*prefetch 'patient'/],
  ];
  for (const [name, version, message] of refused) {
    it(`refuses a canary whose service has ${name} (422 naming the service)`, async () => {
      const before = (await op(request(t.app).get('/admin/tenants/cp-tenant'))).body;
      const res = await setSubs(withCanary(version));
      expect(res.status).to.equal(422);
      expect(res.body.error).to.equal('unprocessable');
      expect(res.body.message).to.match(message);
      expect(res.body.problems).to.have.length(1);
      expect(res.body.problems[0].path).to.equal('subscriptions[0].canary.version');
      expect(res.body.problems[0].message).to.match(message);
      const tenant = await op(request(t.app).get('/admin/tenants/cp-tenant'));
      expect(tenant.body.subscriptions).to.deep.equal(before.subscriptions);
    });
  }

  it('refuses a list over 100 entries before reading any pack (12,500 canary pairs took ~20 s of catalog reads, then 400)', async () => {
    const packs = t.deps.controlPlane.packs;
    const get = packs.get.bind(packs);
    let reads = 0;
    packs.get = async (...args: Parameters<typeof get>) => {
      reads++;
      return get(...args);
    };
    try {
      const res = await setSubs(
        Array.from({ length: 101 }, () => ({
          pack: 'cp',
          version: '1.0.0',
          canary: { version: '1.1.0', percent: 10 },
        })),
      );
      expect(res.status).to.equal(400);
      expect(res.body.message).to.match(/subscriptions.*at most 100 entries/);
    } finally {
      packs.get = get;
    }
    expect(reads).to.equal(0);
  });

  it('refuses a new pinned version that its canary no longer matches', async () => {
    // The check compares the pair as subscribed: moving the pinned version is checked too.
    const res = await setSubs([
      { pack: 'cp', version: '1.2.0', canary: { version: '1.0.1', percent: 10 } },
    ]);
    expect(res.status).to.equal(422);
    expect(res.body.problems[0].path).to.equal('subscriptions[0].canary.version');
  });

  it('accepts a canary with the same hook and prefetch, and routes calls to it', async () => {
    expect((await setSubs(withCanary('1.0.1'))).status).to.equal(200);
    const res = await call();
    expect(res.status).to.equal(200);
    expect(res.body.cards.map((c: { summary: string }) => c.summary)).to.deep.equal(['from 1.0.1']);
  });

  it('accepts a canary without one of the services (its calls stay on the pinned version)', async () => {
    expect((await setSubs(withCanary('1.4.0'))).status).to.equal(200);
  });

  it('evaluates a call with the pinned version when a stored canary does not match', async () => {
    // A subscription stored before the check existed (written under the admin service).
    await t.deps.controlPlane.tenants.setSubscriptions('cp-tenant', withCanary('1.1.0'));
    const res = await call();
    expect(res.status).to.equal(200);
    expect(res.body.cards.map((c: { summary: string }) => c.summary)).to.deep.equal(['from 1.0.0']);
  });
});
