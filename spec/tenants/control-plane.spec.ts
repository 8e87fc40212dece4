import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import type { RulePack } from '../../rules/index.ts';
import {
  ConflictError,
  InvalidInputError,
  NotFoundError,
  hashAdminToken,
  openControlPlane,
} from '../../tenants/index.ts';
import type { ControlPlane, NewTenant } from '../../tenants/index.ts';
import { coalesceReads } from '../../tenants/control-plane.ts';
import { canaryPercentMessage } from '../../server/admin-service.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

function fieldOf(err: Error): string {
  if (!(err instanceof InvalidInputError)) {
    throw new Error(`expected InvalidInputError, got ${err.name}: ${err.message}`);
  }
  return err.field;
}

function pack(id: string, version: string, title = 'A pack'): RulePack {
  return {
    id,
    version,
    title,
    publisher: 'spec',
    description: 'spec pack',
    services: [],
    rules: [],
  };
}

function hashOf(p: RulePack): string {
  return crypto.createHash('sha256').update(JSON.stringify(p)).digest('hex');
}

describe('tenants/ control plane store', () => {
  let dir: string;
  let file: string;
  let cp: ControlPlane;
  let clock: Date;
  let issuer: TestIssuer;

  const tenantInput = (id: string, overrides: Partial<NewTenant> = {}): NewTenant => ({
    id,
    name: `Tenant ${id}`,
    region: 'eu-west',
    issuers: [{ iss: `https://ehr-${id}.example.org`, jwks: issuer.publicJwks() }],
    fhirServers: ['https://fhir.example.org/r4'],
    ...overrides,
  });

  before(async () => {
    issuer = await TestIssuer.create({ iss: 'https://ehr.example.org' });
  });

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
    file = path.join(dir, 'control.sqlite');
    clock = new Date('2025-01-01T00:00:00Z');
    cp = await openControlPlane({ storage: file, now: () => clock });
  });

  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  for (const storage of ['file', ':memory:'] as const) {
    it(`serialises concurrent writes from one process (${storage})`, async () => {
      const db = await openControlPlane({
        storage: storage === 'file' ? path.join(dir, 'c2.sqlite') : ':memory:',
      });
      try {
        const ids = Array.from({ length: 20 }, (_, k) => `t-${k}`);
        const p = pack('med-safety', '1.0.0');
        const results = await Promise.allSettled([
          ...ids.map((id) => db.tenants.create(tenantInput(id))),
          ...ids.map((id) => db.audit.record({ type: 'x.y', outcome: 'success', tenant: id })),
          ...ids.map(() => db.adminTokens.issue({ role: 'platform-operator' })),
          ...ids.map(() =>
            db.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p }),
          ),
        ]);
        expect(results.filter((r) => r.status === 'rejected')).to.deep.equal([]);
        expect(await db.tenants.list()).to.have.length(20);
        expect((await db.audit.list()).map((e) => e.seq)).to.deep.equal(ids.map((_, k) => k + 1));
        expect(await db.adminTokens.list()).to.have.length(20);
        expect(await db.packs.list()).to.have.length(1);
      } finally {
        await db.close();
      }
    });
  }

  // `npm start` with a region matrix runs one process per region on one control-plane file:
  // they create the schema at the same moment and then write to it side by side.
  it('lets several openers create a new file at once, then write to it side by side', async () => {
    const file = path.join(dir, 'shared.sqlite');
    const openers = await Promise.all(
      Array.from({ length: 4 }, () => openControlPlane({ storage: file })),
    );
    try {
      const results = await Promise.allSettled(
        openers.flatMap((db, i) =>
          Array.from({ length: 15 }, (_, k) =>
            db.audit.record({ type: 'x.y', outcome: 'success', detail: { opener: i, k } }),
          ),
        ),
      );
      expect(results.filter((r) => r.status === 'rejected')).to.deep.equal([]);
      const events = await openers[0]!.audit.list();
      expect(events.map((e) => e.seq)).to.deep.equal(events.map((_, k) => k + 1));
      expect(events).to.have.length(60);
      expect((await openers[3]!.audit.verify()).ok).to.equal(true);
    } finally {
      await Promise.all(openers.map((db) => db.close()));
    }
  });

  describe('tenants', () => {
    it('creates, reads and lists tenants as plain objects', async () => {
      const created = await cp.tenants.create(tenantInput('acme'));
      expect(created).to.deep.equal({
        id: 'acme',
        name: 'Tenant acme',
        region: 'eu-west',
        status: 'active',
        issuers: [{ iss: 'https://ehr-acme.example.org', jwks: issuer.publicJwks() }],
        fhirServers: ['https://fhir.example.org/r4'],
        subscriptions: [],
        createdAt: '2025-01-01T00:00:00.000Z',
        updatedAt: '2025-01-01T00:00:00.000Z',
      });
      await cp.tenants.create(tenantInput('beta'));
      expect(await cp.tenants.get('acme')).to.deep.equal(created);
      expect((await cp.tenants.list()).map((t) => t.id)).to.deep.equal(['acme', 'beta']);
    });

    it('uses WAL mode for a file database and keeps data across reopen', async () => {
      await cp.tenants.create(tenantInput('acme'));
      await cp.close();
      cp = await openControlPlane({ storage: file });
      expect((await cp.tenants.get('acme')).name).to.equal('Tenant acme');
      expect(fs.existsSync(`${file}-wal`)).to.equal(true);
    });

    it('refuses a duplicate id with ConflictError', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const err = await rejection(cp.tenants.create(tenantInput('acme')));
      expect(err).to.be.instanceOf(ConflictError);
    });

    it('throws NotFoundError for an unknown tenant', async () => {
      expect(await rejection(cp.tenants.get('nobody'))).to.be.instanceOf(NotFoundError);
      expect(await rejection(cp.tenants.update('nobody', { name: 'x' }))).to.be.instanceOf(
        NotFoundError,
      );
      expect(await rejection(cp.tenants.remove('nobody'))).to.be.instanceOf(NotFoundError);
      expect(await rejection(cp.tenants.setSubscriptions('nobody', []))).to.be.instanceOf(
        NotFoundError,
      );
    });

    it('finds every tenant registered for an issuer (the same iss may serve several)', async () => {
      const shared = { iss: 'https://shared-ehr.example.org', jwks: issuer.publicJwks() };
      await cp.tenants.create(tenantInput('acme', { issuers: [shared] }));
      await cp.tenants.create(tenantInput('beta', { issuers: [shared], sharedIssuer: true }));
      await cp.tenants.create(tenantInput('gamma'));
      expect((await cp.tenants.findByIssuer(shared.iss)).map((t) => t.id)).to.deep.equal([
        'acme',
        'beta',
      ]);
      expect(
        (await cp.tenants.findByIssuer('https://ehr-gamma.example.org')).map((t) => t.id),
      ).to.deep.equal(['gamma']);
      expect(await cp.tenants.findByIssuer('https://unknown.example.org')).to.deep.equal([]);
    });

    it('keeps the most recently used issuers when more are calling than it keeps', async () => {
      const small = await openControlPlane({
        storage: ':memory:',
        now: () => clock,
        maxIssuerCache: 2,
      });
      try {
        for (const id of ['acme', 'beta', 'gamma']) {
          await small.tenants.create(tenantInput(id));
        }
        const find = async (id: string) =>
          (await small.tenants.findByIssuer(`https://ehr-${id}.example.org`))[0];
        const acme = await find('acme');
        const beta = await find('beta');
        // A cached answer is the very same (frozen) object; a fresh read is a new one.
        expect(await find('acme')).to.equal(acme);
        await find('gamma'); // full: beta, the least recently used, goes
        expect(await find('acme')).to.equal(acme);
        const betaAgain = await find('beta');
        expect(betaAgain).to.not.equal(beta);
        expect(betaAgain).to.deep.equal(beta);
      } finally {
        await small.close();
      }
    });

    // findByIssuer answers the hook path from a cache: a change must show at once, whoever
    // made it (this process, or another process such as the CLI writing the same file).
    it('sees a suspension, an issuer change and a removal at once, from this or another process', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      expect((await cp.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
      const other = await openControlPlane({ storage: file, now: () => clock });
      try {
        await other.tenants.update('acme', { status: 'suspended' });
        expect((await cp.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal([
          'suspended',
        ]);
        await cp.tenants.update('acme', { status: 'active' });
        expect((await cp.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
        await other.tenants.update('acme', {
          issuers: [{ iss: 'https://moved.example.org', jwks: issuer.publicJwks() }],
        });
        expect(await cp.tenants.findByIssuer(iss)).to.deep.equal([]);
        expect(
          (await cp.tenants.findByIssuer('https://moved.example.org')).map((t) => t.id),
        ).to.deep.equal(['acme']);
        await other.tenants.remove('acme');
        expect(await cp.tenants.findByIssuer('https://moved.example.org')).to.deep.equal([]);
      } finally {
        await other.close();
      }
    });

    // Lookups in flight share the data_version read (coalesceReads): one that starts after a
    // commit of another process must still see it, however many were running before.
    it("sees another process's suspension in every lookup started after it, under concurrency", async () => {
      await cp.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      const other = await openControlPlane({ storage: file, now: () => clock });
      try {
        const before = Array.from({ length: 20 }, () => cp.tenants.findByIssuer(iss));
        await other.tenants.update('acme', { status: 'suspended' });
        const after = Array.from({ length: 20 }, () => cp.tenants.findByIssuer(iss));
        await Promise.all(before);
        for (const found of await Promise.all(after)) {
          expect(found.map((t) => t.status)).to.deep.equal(['suspended']);
        }
      } finally {
        await other.close();
      }
    });

    it('hands out answers a caller cannot use to change what the next caller gets', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      const first = await cp.tenants.findByIssuer(iss);
      first.pop();
      const again = await cp.tenants.findByIssuer(iss);
      expect(again.map((t) => t.id)).to.deep.equal(['acme']);
      expect(() => {
        (again[0] as { status: string }).status = 'active-forever';
      }).to.throw(TypeError);
    });

    // The SMART launch page asks on every unauthenticated request: one frozen answer per
    // control-plane generation, and a change by any process shows at once.
    it('answers the active tenants’ FHIR servers from memory until the control plane changes', async () => {
      await cp.tenants.create(tenantInput('acme'));
      await cp.tenants.create(
        tenantInput('beta', {
          fhirServers: ['https://fhir.example.org/r4', 'https://b.example.org'],
        }),
      );
      const first = await cp.tenants.activeFhirServers();
      expect([...first].sort()).to.deep.equal([
        'https://b.example.org',
        'https://fhir.example.org/r4',
      ]);
      expect(Object.isFrozen(first)).to.equal(true);
      expect(await cp.tenants.activeFhirServers()).to.equal(first); // same answer, no read
      const other = await openControlPlane({ storage: file, now: () => clock });
      try {
        await other.tenants.update('beta', { status: 'suspended' });
        expect(await cp.tenants.activeFhirServers()).to.deep.equal(['https://fhir.example.org/r4']);
        await cp.tenants.update('acme', { fhirServers: ['https://a.example.org/fhir'] });
        expect(await cp.tenants.activeFhirServers()).to.deep.equal(['https://a.example.org/fhir']);
        await other.tenants.remove('acme');
        expect(await cp.tenants.activeFhirServers()).to.deep.equal([]);
      } finally {
        await other.close();
      }
    });

    it('updates fields, re-indexes issuers and bumps updatedAt', async () => {
      await cp.tenants.create(tenantInput('acme'));
      clock = new Date('2025-02-01T00:00:00Z');
      const updated = await cp.tenants.update('acme', {
        name: 'Acme Health',
        status: 'suspended',
        issuers: [
          { iss: 'https://new-ehr.example.org', jwksUri: 'https://new-ehr.example.org/jwks' },
        ],
      });
      expect(updated.name).to.equal('Acme Health');
      expect(updated.status).to.equal('suspended');
      expect(updated.updatedAt).to.equal('2025-02-01T00:00:00.000Z');
      expect(updated.createdAt).to.equal('2025-01-01T00:00:00.000Z');
      expect(await cp.tenants.get('acme')).to.deep.equal(updated);
      expect(await cp.tenants.findByIssuer('https://ehr-acme.example.org')).to.deep.equal([]);
      expect(
        (await cp.tenants.findByIssuer('https://new-ehr.example.org')).map((t) => t.id),
      ).to.deep.equal(['acme']);
    });

    it('removes a tenant, its issuer index and its scoped admin tokens', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const { token } = await cp.adminTokens.issue({ role: 'tenant-admin', tenant: 'acme' });
      expect(await cp.adminTokens.authenticate(token)).to.not.equal(undefined);
      await cp.tenants.remove('acme');
      expect(await rejection(cp.tenants.get('acme'))).to.be.instanceOf(NotFoundError);
      expect(await cp.tenants.findByIssuer('https://ehr-acme.example.org')).to.deep.equal([]);
      expect(await cp.adminTokens.authenticate(token)).to.equal(undefined);
    });

    describe('validation names the field and stores nothing', () => {
      const privateEc = (): Record<string, unknown> => ({
        ...issuer.publicJwks().keys[0],
        d: 'AAAA',
      });
      const cases: Array<[string, () => unknown, string]> = [
        ['an id with capitals', () => tenantInput('Acme'), 'id'],
        ['a one-character id', () => tenantInput('a'), 'id'],
        ['an id starting with a dash', () => tenantInput('-acme'), 'id'],
        ['a 64-character id', () => tenantInput('a'.repeat(64)), 'id'],
        ['an empty name', () => tenantInput('acme', { name: '' }), 'name'],
        ['a region with spaces', () => tenantInput('acme', { region: 'EU West' }), 'region'],
        ['no issuers', () => tenantInput('acme', { issuers: [] }), 'issuers'],
        ['issuers not an array', () => ({ ...tenantInput('acme'), issuers: 'x' }), 'issuers'],
        [
          'an iss that is not a URI',
          () => tenantInput('acme', { issuers: [{ iss: 'not a uri', jwks: issuer.publicJwks() }] }),
          'issuers[0].iss',
        ],
        [
          'both jwks and jwksUri',
          () =>
            tenantInput('acme', {
              issuers: [
                {
                  iss: 'https://e.example',
                  jwks: issuer.publicJwks(),
                  jwksUri: 'https://e.example/jwks',
                },
              ],
            }),
          'issuers[0]',
        ],
        [
          'neither jwks nor jwksUri',
          () => tenantInput('acme', { issuers: [{ iss: 'https://e.example' }] }),
          'issuers[0]',
        ],
        [
          'a private EC key (d)',
          () =>
            tenantInput('acme', {
              issuers: [{ iss: 'https://e.example', jwks: { keys: [privateEc()] } }],
            }),
          'issuers[0].jwks.keys[0]',
        ],
        [
          'a symmetric key (k)',
          () =>
            tenantInput('acme', {
              issuers: [
                {
                  iss: 'https://e.example',
                  jwks: { keys: [{ kty: 'oct', kid: 'h', k: 'c2VjcmV0' }] },
                },
              ],
            }),
          'issuers[0].jwks.keys[0]',
        ],
        [
          'a key without kid',
          () => {
            const { kid: _kid, ...rest } = issuer.publicJwks().keys[0]!;
            return tenantInput('acme', {
              issuers: [{ iss: 'https://e.example', jwks: { keys: [rest] } }],
            });
          },
          'issuers[0].jwks.keys[0].kid',
        ],
        [
          'a single JWK where a JWK Set belongs',
          () => ({
            ...tenantInput('acme'),
            issuers: [{ iss: 'https://e.example', jwks: issuer.publicJwks().keys[0] }],
          }),
          'issuers[0].jwks',
        ],
        [
          'an empty key set',
          () =>
            tenantInput('acme', { issuers: [{ iss: 'https://e.example', jwks: { keys: [] } }] }),
          'issuers[0].jwks.keys',
        ],
        [
          'a jwksUri over plain http',
          () =>
            tenantInput('acme', {
              issuers: [{ iss: 'https://e.example', jwksUri: 'http://e.example/jwks' }],
            }),
          'issuers[0].jwksUri',
        ],
        [
          'a relative jwksUri',
          () => tenantInput('acme', { issuers: [{ iss: 'https://e.example', jwksUri: '/jwks' }] }),
          'issuers[0].jwksUri',
        ],
        [
          'a jku over plain http',
          () =>
            tenantInput('acme', {
              issuers: [
                {
                  iss: 'https://e.example',
                  jwks: issuer.publicJwks(),
                  jku: ['https://e.example/k', 'http://evil.example/k'],
                },
              ],
            }),
          'issuers[0].jku[1]',
        ],
        [
          'the same iss twice',
          () =>
            tenantInput('acme', {
              issuers: [
                { iss: 'https://e.example', jwks: issuer.publicJwks() },
                { iss: 'https://e.example', jwks: issuer.publicJwks() },
              ],
            }),
          'issuers[1].iss',
        ],
        [
          'a relative FHIR server',
          () => tenantInput('acme', { fhirServers: ['/fhir'] }),
          'fhirServers[0]',
        ],
        [
          'an ftp FHIR server',
          () =>
            tenantInput('acme', {
              fhirServers: ['https://ok.example/fhir', 'ftp://x.example/fhir'],
            }),
          'fhirServers[1]',
        ],
        ['an unknown field', () => ({ ...tenantInput('acme'), color: 'blue' }), 'color'],
        [
          'a __proto__ key',
          () =>
            JSON.parse(
              `{"__proto__":{"x":1},${JSON.stringify(tenantInput('acme')).slice(1)}`,
            ) as unknown,
          '__proto__',
        ],
      ];
      for (const [name, make, field] of cases) {
        it(`refuses ${name} (${field})`, async () => {
          const err = await rejection(cp.tenants.create(make() as NewTenant));
          expect(err).to.be.instanceOf(InvalidInputError);
          expect(fieldOf(err)).to.equal(field);
          expect(err.message.startsWith(`${field}: `)).to.equal(true);
          expect(await cp.tenants.list()).to.deep.equal([]);
        });
      }

      it('says how to fix a single JWK given as the key set', async () => {
        const err = await rejection(
          cp.tenants.create({
            ...tenantInput('acme'),
            issuers: [{ iss: 'https://e.example', jwks: issuer.publicJwks().keys[0] }],
          } as unknown as NewTenant),
        );
        expect(err.message).to.include('wrap the key in {"keys": [ ... ]}');
      });

      it('accepts http JWKS URLs on 127.0.0.1 and localhost only', async () => {
        const t = await cp.tenants.create(
          tenantInput('acme', {
            issuers: [
              { iss: 'https://a.example', jwksUri: 'http://127.0.0.1:8080/jwks' },
              {
                iss: 'https://b.example',
                jwksUri: 'http://localhost:8080/jwks',
                jku: ['https://b.example/jwks'],
              },
            ],
          }),
        );
        expect(t.issuers).to.have.length(2);
      });

      it('refuses an invalid patch and leaves the tenant unchanged', async () => {
        const before = await cp.tenants.create(tenantInput('acme'));
        for (const [patch, field] of [
          [{ status: 'deleted' }, 'status'],
          [{ name: '' }, 'name'],
          [{ issuers: [] }, 'issuers'],
          [{ region: 'us' }, 'region'],
          [{ id: 'other' }, 'id'],
        ] as const) {
          const err = await rejection(cp.tenants.update('acme', patch as never));
          expect(err, JSON.stringify(patch)).to.be.instanceOf(InvalidInputError);
          expect(fieldOf(err)).to.equal(field);
        }
        expect(await cp.tenants.get('acme')).to.deep.equal(before);
      });
    });

    describe('subscriptions', () => {
      beforeEach(async () => {
        await cp.tenants.create(tenantInput('acme'));
        for (const v of ['1.0.0', '1.1.0']) {
          const p = pack('med-safety', v);
          await cp.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p });
        }
      });

      it('stores pinned and canary subscriptions to catalog versions', async () => {
        const subs = [
          { pack: 'med-safety', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
        ];
        const t = await cp.tenants.setSubscriptions('acme', subs);
        expect(t.subscriptions).to.deep.equal(subs);
        expect((await cp.tenants.get('acme')).subscriptions).to.deep.equal(subs);
        expect((await cp.tenants.setSubscriptions('acme', [])).subscriptions).to.deep.equal([]);
      });

      // Replicas poll it every few seconds for versions to warm (server/service-directory.ts):
      // one frozen answer per control-plane generation, and a change by any process shows.
      it('answers the subscribed versions from memory until the control plane changes', async () => {
        await cp.tenants.setSubscriptions('acme', [{ pack: 'med-safety', version: '1.0.0' }]);
        const first = await cp.tenants.subscribedVersions();
        expect(first).to.deep.equal([['med-safety', '1.0.0']]);
        expect(Object.isFrozen(first)).to.equal(true);
        expect(await cp.tenants.subscribedVersions()).to.equal(first); // same answer, no read
        const other = await openControlPlane({ storage: file, now: () => clock });
        try {
          await other.tenants.setSubscriptions('acme', [
            { pack: 'med-safety', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
          ]);
          expect(await cp.tenants.subscribedVersions()).to.deep.equal([
            ['med-safety', '1.0.0'],
            ['med-safety', '1.1.0'],
          ]);
          await other.tenants.update('acme', { status: 'suspended' });
          expect(await cp.tenants.subscribedVersions()).to.deep.equal([]);
        } finally {
          await other.close();
        }
      });

      const bad: Array<[string, unknown, string]> = [
        ['an unknown pack', [{ pack: 'nope', version: '1.0.0' }], 'subscriptions[0].version'],
        [
          'an unknown version',
          [{ pack: 'med-safety', version: '2.0.0' }],
          'subscriptions[0].version',
        ],
        [
          'a non-semver version',
          [{ pack: 'med-safety', version: 'latest' }],
          'subscriptions[0].version',
        ],
        [
          'an unknown canary version',
          [{ pack: 'med-safety', version: '1.0.0', canary: { version: '9.9.9', percent: 5 } }],
          'subscriptions[0].canary.version',
        ],
        [
          'a canary over 100%',
          [{ pack: 'med-safety', version: '1.0.0', canary: { version: '1.1.0', percent: 101 } }],
          'subscriptions[0].canary.percent',
        ],
        [
          'a negative canary',
          [{ pack: 'med-safety', version: '1.0.0', canary: { version: '1.1.0', percent: -1 } }],
          'subscriptions[0].canary.percent',
        ],
        [
          'the same pack twice',
          [
            { pack: 'med-safety', version: '1.0.0' },
            { pack: 'med-safety', version: '1.1.0' },
          ],
          'subscriptions[1].pack',
        ],
        [
          'an unknown field',
          [{ pack: 'med-safety', version: '1.0.0', tier: 'gold' }],
          'subscriptions[0].tier',
        ],
        ['not an array', { pack: 'med-safety' }, 'subscriptions'],
      ];
      for (const [name, subs, field] of bad) {
        it(`refuses ${name} (${field})`, async () => {
          const err = await rejection(cp.tenants.setSubscriptions('acme', subs as never));
          expect(err).to.be.instanceOf(InvalidInputError);
          expect(fieldOf(err)).to.equal(field);
          expect((await cp.tenants.get('acme')).subscriptions).to.deep.equal([]);
        });
      }

      // The admin API caps a canary at 50 % (a full rollout is a pin); a direct control-plane
      // write (another tool, a script on the database host) is held to the same cap and message.
      for (const percent of [51, 99.5, 100]) {
        it(`refuses a canary at ${percent} % on a direct write, with the admin API's message`, async () => {
          const canary = { version: '1.1.0', percent };
          const many = await rejection(
            cp.tenants.setSubscriptions('acme', [{ pack: 'med-safety', version: '1.0.0', canary }]),
          );
          expect(fieldOf(many)).to.equal('subscriptions[0].canary.percent');
          expect(many.message).to.include(canaryPercentMessage('1.1.0'));
          const one = await rejection(
            cp.tenants.setSubscription('acme', { pack: 'med-safety', version: '1.0.0', canary }),
          );
          expect(fieldOf(one)).to.equal('canary.percent');
          expect(one.message).to.include(canaryPercentMessage('1.1.0'));
          expect((await cp.tenants.get('acme')).subscriptions).to.deep.equal([]);
        });
      }

      it('stores a canary at exactly 50 %', async () => {
        const subs = [
          { pack: 'med-safety', version: '1.0.0', canary: { version: '1.1.0', percent: 50 } },
        ];
        expect((await cp.tenants.setSubscriptions('acme', subs)).subscriptions).to.deep.equal(subs);
      });
    });
  });

  describe('packs', () => {
    it('stores a version once; identical re-upload is unchanged; different content is a conflict', async () => {
      const p = pack('med-safety', '1.0.0');
      expect(
        await cp.packs.put({
          id: p.id,
          version: p.version,
          hash: hashOf(p),
          pack: p,
          uploadedBy: 'rule-author:t1',
        }),
      ).to.equal('created');
      expect(
        await cp.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p }),
      ).to.equal('unchanged');
      const changed = pack('med-safety', '1.0.0', 'Changed title');
      const err = await rejection(
        cp.packs.put({
          id: changed.id,
          version: changed.version,
          hash: hashOf(changed),
          pack: changed,
        }),
      );
      expect(err).to.be.instanceOf(ConflictError);
      const stored = await cp.packs.get('med-safety', '1.0.0');
      expect(stored).to.deep.equal({
        id: 'med-safety',
        version: '1.0.0',
        hash: hashOf(p),
        pack: p,
        uploadedAt: '2025-01-01T00:00:00.000Z',
        uploadedBy: 'rule-author:t1',
      });
    });

    it('lists the catalog without bodies and sorts versions by semver', async () => {
      for (const v of ['1.10.0', '1.2.0', '1.9.1']) {
        const p = pack('med-safety', v);
        await cp.packs.put({ id: p.id, version: v, hash: hashOf(p), pack: p });
      }
      const other = pack('renal', '0.1.0');
      await cp.packs.put({
        id: other.id,
        version: other.version,
        hash: hashOf(other),
        pack: other,
      });
      expect(await cp.packs.versions('med-safety')).to.deep.equal(['1.2.0', '1.9.1', '1.10.0']);
      expect(await cp.packs.versions('unknown')).to.deep.equal([]);
      const list = await cp.packs.list();
      expect(list).to.have.length(4);
      for (const row of list) {
        expect(row).to.have.all.keys('id', 'version', 'hash', 'uploadedAt');
      }
    });

    it('throws NotFoundError for an unknown version and InvalidInputError for bad input', async () => {
      expect(await rejection(cp.packs.get('med-safety', '1.0.0'))).to.be.instanceOf(NotFoundError);
      const p = pack('med-safety', '1.0.0');
      const badHash = await rejection(
        cp.packs.put({ id: p.id, version: p.version, hash: 'abc', pack: p }),
      );
      expect(fieldOf(badHash)).to.equal('hash');
      const mismatch = await rejection(
        cp.packs.put({ id: 'other', version: p.version, hash: hashOf(p), pack: p }),
      );
      expect(fieldOf(mismatch)).to.equal('pack');
    });
  });

  describe('admin tokens', () => {
    it('issues a prefixed random token, authenticates it, and revokes it', async () => {
      const issued = await cp.adminTokens.issue({ role: 'platform-operator', label: 'bootstrap' });
      expect(issued.token).to.match(/^ccds_[A-Za-z0-9_-]{43}$/);
      expect(await cp.adminTokens.authenticate(issued.token)).to.deep.equal({
        tokenId: issued.id,
        role: 'platform-operator',
      });
      const other = await cp.adminTokens.issue({ role: 'platform-operator' });
      expect(other.token).to.not.equal(issued.token);
      await cp.adminTokens.revoke(issued.id);
      expect(await cp.adminTokens.authenticate(issued.token)).to.equal(undefined);
      expect(await cp.adminTokens.authenticate(other.token)).to.not.equal(undefined);
      expect(await rejection(cp.adminTokens.revoke('tok_unknown'))).to.be.instanceOf(NotFoundError);
    });

    it('authenticates nobody for unknown, altered or malformed tokens', async () => {
      const { token } = await cp.adminTokens.issue({ role: 'rule-author' });
      const altered = token.slice(0, -1) + (token.endsWith('A') ? 'B' : 'A');
      for (const t of [
        altered,
        '',
        'ccds_',
        token.slice(5),
        `${token}x`,
        `Bearer ${token}`,
        hashAdminToken(token),
      ]) {
        expect(await cp.adminTokens.authenticate(t), t).to.equal(undefined);
      }
    });

    it('scopes tenant-admin and auditor tokens to an existing tenant, and only those', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const ta = await cp.adminTokens.issue({ role: 'tenant-admin', tenant: 'acme' });
      expect(await cp.adminTokens.authenticate(ta.token)).to.deep.equal({
        tokenId: ta.id,
        role: 'tenant-admin',
        tenant: 'acme',
      });
      const cases: Array<[unknown, string]> = [
        [{ role: 'tenant-admin' }, 'tenant'],
        [{ role: 'auditor', tenant: 'nobody' }, 'tenant'],
        [{ role: 'platform-operator', tenant: 'acme' }, 'tenant'],
        [{ role: 'rule-author', tenant: 'acme' }, 'tenant'],
        [{ role: 'root' }, 'role'],
        [{ role: 'auditor', tenant: 'acme', label: 'x'.repeat(201) }, 'label'],
      ];
      for (const [input, field] of cases) {
        const err = await rejection(cp.adminTokens.issue(input as never));
        expect(err, JSON.stringify(input)).to.be.instanceOf(InvalidInputError);
        expect(fieldOf(err)).to.equal(field);
      }
    });

    it('lists tokens without hashes or secrets', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const a = await cp.adminTokens.issue({
        role: 'auditor',
        tenant: 'acme',
        label: 'quarterly review',
      });
      const b = await cp.adminTokens.issue({ role: 'platform-operator' });
      await cp.adminTokens.revoke(b.id);
      const list = await cp.adminTokens.list();
      expect(list).to.deep.include({
        id: a.id,
        role: 'auditor',
        tenant: 'acme',
        label: 'quarterly review',
        createdAt: '2025-01-01T00:00:00.000Z',
        expiresAt: '2025-04-01T00:00:00.000Z',
      });
      expect(list).to.deep.include({
        id: b.id,
        role: 'platform-operator',
        createdAt: '2025-01-01T00:00:00.000Z',
        expiresAt: '2025-04-01T00:00:00.000Z',
        revokedAt: '2025-01-01T00:00:00.000Z',
      });
      const text = JSON.stringify(list);
      for (const t of [a, b]) {
        expect(text).to.not.include(t.token);
        expect(text).to.not.include(hashAdminToken(t.token));
      }
    });

    it('never writes the token to the database files, only its sha256', async () => {
      const { token } = await cp.adminTokens.issue({ role: 'platform-operator' });
      const secret = token.slice('ccds_'.length);
      const files = fs.readdirSync(dir).map((f) => path.join(dir, f));
      expect(files.some((f) => f.endsWith('-wal'))).to.equal(true);
      const bytes = Buffer.concat(files.map((f) => fs.readFileSync(f)));
      expect(bytes.includes(Buffer.from(secret))).to.equal(false);
      expect(bytes.includes(Buffer.from(hashAdminToken(token)))).to.equal(true);
    });
  });

  describe('audit', () => {
    it('appends events in order and filters by tenant, type and time', async () => {
      await cp.audit.record({
        type: 'admin.tenant.create',
        outcome: 'success',
        tenant: 'acme',
        actor: 'platform-operator:tok_1',
      });
      clock = new Date('2025-01-02T00:00:00Z');
      await cp.audit.record({
        type: 'auth.failure',
        outcome: 'failure',
        tenant: 'acme',
        detail: { reason: 'expired', iss: 'https://e.example' },
      });
      clock = new Date('2025-01-03T00:00:00Z');
      await cp.audit.record({
        type: 'auth.failure',
        outcome: 'failure',
        tenant: 'beta',
        detail: { reason: 'bad_aud' },
      });
      const all = await cp.audit.list();
      expect(all.map((e) => e.seq)).to.deep.equal([1, 2, 3]);
      expect(all[1]).to.deep.equal({
        seq: 2,
        at: '2025-01-02T00:00:00.000Z',
        type: 'auth.failure',
        outcome: 'failure',
        tenant: 'acme',
        detail: { reason: 'expired', iss: 'https://e.example' },
      });
      expect((await cp.audit.list({ tenant: 'acme' })).map((e) => e.seq)).to.deep.equal([1, 2]);
      expect((await cp.audit.list({ type: 'auth.failure' })).map((e) => e.seq)).to.deep.equal([
        2, 3,
      ]);
      expect(
        (await cp.audit.list({ from: '2025-01-02T00:00:00Z' })).map((e) => e.seq),
      ).to.deep.equal([2, 3]);
      expect(
        (await cp.audit.list({ to: new Date('2025-01-02T00:00:00Z') })).map((e) => e.seq),
      ).to.deep.equal([1]);
      expect(await rejection(cp.audit.list({ from: 'yesterday' }))).to.be.instanceOf(
        InvalidInputError,
      );
    });

    it('refuses events with nested or oversized detail', async () => {
      for (const [event, field] of [
        [{ type: 'x.y', outcome: 'success', detail: { nested: { a: 1 } } }, 'detail.nested'],
        [{ type: 'x.y', outcome: 'maybe' }, 'outcome'],
        [{ type: '', outcome: 'success' }, 'type'],
        [{ type: 'x.y', outcome: 'success', detail: { s: 'x'.repeat(1001) } }, 'detail.s'],
      ] as const) {
        const err = await rejection(cp.audit.record(event as never));
        expect(fieldOf(err)).to.equal(field);
      }
      expect(await cp.audit.list()).to.deep.equal([]);
    });

    it('is append-only in the database itself (UPDATE and DELETE are refused)', async () => {
      await cp.audit.record({ type: 'admin.tenant.create', outcome: 'success' });
      const db = new sqlite3.Database(file);
      const run = (sql: string): Promise<Error | undefined> =>
        new Promise((resolve) => {
          db.run(sql, (err: Error | null) => {
            resolve(err ?? undefined);
          });
        });
      try {
        expect((await run("UPDATE audit_events SET outcome = 'failure'"))?.message).to.include(
          'append-only',
        );
        expect((await run('DELETE FROM audit_events'))?.message).to.include('append-only');
      } finally {
        await new Promise((resolve) => {
          db.close(resolve);
        });
      }
      expect((await cp.audit.list())[0]?.outcome).to.equal('success');
    });
  });
});

describe('tenants/ control plane: coalesceReads', () => {
  /** A read whose calls are counted and settled, oldest first, by the spec. */
  function controlled(): {
    read: () => Promise<number>;
    calls: () => number;
    settle: (value: number | Error) => void;
  } {
    const waiting: Array<{ resolve: (v: number) => void; reject: (e: Error) => void }> = [];
    let calls = 0;
    return {
      read: () =>
        new Promise<number>((resolve, reject) => {
          calls += 1;
          waiting.push({ resolve, reject });
        }),
      calls: () => calls,
      settle: (value) => {
        const oldest = waiting.shift();
        if (!oldest) {
          throw new Error('no read is waiting');
        }
        if (value instanceof Error) {
          oldest.reject(value);
        } else {
          oldest.resolve(value);
        }
      },
    };
  }
  const tick = () => new Promise((resolve) => setImmediate(resolve));

  it('gives callers that arrive during a read the next read, shared, never the running one', async () => {
    const c = controlled();
    const get = coalesceReads(c.read);
    const first = get();
    const during = [get(), get(), get()];
    expect(c.calls()).to.equal(1);
    c.settle(1);
    expect(await first).to.equal(1);
    await tick();
    expect(c.calls()).to.equal(2); // one more read for all three
    const late = get(); // arrives while that second read runs
    c.settle(2);
    expect(await Promise.all(during)).to.deep.equal([2, 2, 2]);
    await tick();
    c.settle(3);
    expect(await late).to.equal(3);
    expect(c.calls()).to.equal(3);
  });

  it('rejects the callers of a failed read only; the next caller reads again', async () => {
    const c = controlled();
    const get = coalesceReads(c.read);
    const first = get();
    const during = get();
    c.settle(new Error('disk'));
    expect((await rejection(first)).message).to.equal('disk');
    await tick();
    c.settle(5);
    expect(await during).to.equal(5);
    const after = get();
    c.settle(6);
    expect(await after).to.equal(6);
  });
});
