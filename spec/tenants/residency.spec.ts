import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import {
  assertMayServe,
  checkFailover,
  checkMigration,
  checkPlacement,
  effectiveResidency,
  InvalidInputError,
  mayBackupTo,
  mayMigrate,
  mayServe,
  openControlPlane,
  RegionMismatchError,
  ResidencyError,
} from '../../tenants/index.ts';
import type {
  ControlPlane,
  NewTenant,
  RegionInfo,
  ResidencyPolicyInput,
  ResidencyReason,
  ResidencySubject,
} from '../../tenants/index.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

/** Two jurisdictions, two regions each; us-east may fail over to us-west and (by topology) eu-west. */
const MATRIX: RegionInfo[] = [
  { id: 'us-east', jurisdiction: 'US', failover: ['us-west', 'eu-west'] },
  { id: 'us-west', jurisdiction: 'US', failover: ['us-east'] },
  { id: 'eu-west', jurisdiction: 'EU', failover: ['eu-central', 'us-east'] },
  { id: 'eu-central', jurisdiction: 'EU', failover: ['eu-west'] },
];

const reasons = (problems: ReadonlyArray<{ reason: ResidencyReason }>) =>
  problems.map((p) => p.reason);

function problemsOf(err: Error): readonly { reason: ResidencyReason }[] {
  if (!(err instanceof ResidencyError)) {
    throw new Error(`expected ResidencyError, got ${err.name}: ${err.message}`);
  }
  return err.problems;
}

function fieldOf(err: Error): string {
  if (!(err instanceof InvalidInputError)) {
    throw new Error(`expected InvalidInputError, got ${err.name}: ${err.message}`);
  }
  return err.field;
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

describe('tenants/ residency policy', () => {
  describe('placement (checkPlacement)', () => {
    const cases: Array<[string, ResidencyPolicyInput | undefined, string, string[]]> = [
      ['the default policy in a configured region', undefined, 'us-east', []],
      [
        'an EU-only policy with an EU home',
        { processingRegions: ['eu-west', 'eu-central'], backupRegions: ['eu-central'] },
        'eu-west',
        [],
      ],
      [
        'a DR region list of configured regions',
        { processingRegions: ['us-east'], dr: { mode: 'regions', regions: ['us-west'] } },
        'us-east',
        [],
      ],
      [
        'a home that is not a processing region',
        { processingRegions: ['eu-central'] },
        'eu-west',
        ['region: home_not_processing'],
      ],
      ['an unknown home region', undefined, 'ap-south', ['region: unknown_region']],
      [
        'an unknown processing region',
        { processingRegions: ['us-east', 'ap-south'] },
        'us-east',
        ['residency.processingRegions[1]: unknown_region'],
      ],
      [
        'an unknown backup region',
        { backupRegions: ['us-east', 'moon-1'] },
        'us-east',
        ['residency.backupRegions[1]: unknown_region'],
      ],
      [
        'an unknown DR region',
        { dr: { mode: 'regions', regions: ['ap-south'] } },
        'us-east',
        ['residency.dr.regions[0]: unknown_region'],
      ],
      // A DR region processes the tenant's calls during a failover: it may not widen the
      // jurisdictions the processing regions allow.
      [
        'a DR region in another jurisdiction than every processing region',
        {
          processingRegions: ['us-east'],
          backupRegions: ['us-east'],
          dr: { mode: 'regions', regions: ['us-west', 'eu-west'] },
        },
        'us-east',
        ['residency.dr.regions[1]: dr_other_jurisdiction'],
      ],
      [
        'a DR region in another jurisdiction, processing defaulted to the home',
        { dr: { mode: 'regions', regions: ['eu-west'] } },
        'us-east',
        ['residency.dr.regions[0]: dr_other_jurisdiction'],
      ],
      [
        'a DR region in the jurisdiction of a processing region (not itself a processing region)',
        {
          processingRegions: ['us-east', 'eu-central'],
          dr: { mode: 'regions', regions: ['eu-west'] },
        },
        'us-east',
        [],
      ],
    ];
    for (const [name, policy, home, expected] of cases) {
      it(`${expected.length === 0 ? 'allows' : 'refuses'} ${name}`, () => {
        const problems = checkPlacement(policy, home, MATRIX);
        expect(problems.map((p) => `${p.path}: ${p.reason}`)).to.deep.equal(expected);
        for (const p of problems) {
          expect(p.message).to.be.a('string').and.not.equal('');
        }
      });
    }

    it('without a matrix checks only that the home is a processing region', () => {
      expect(
        checkPlacement({ processingRegions: ['ap-south'] }, 'ap-south', undefined),
      ).to.deep.equal([]);
      expect(
        reasons(checkPlacement({ processingRegions: ['us-west'] }, 'us-east', undefined)),
      ).to.deep.equal(['home_not_processing']);
    });

    it('fills the defaults: processing and backups in the home region, no DR', () => {
      expect(effectiveResidency({ region: 'eu-west' })).to.deep.equal({
        processingRegions: ['eu-west'],
        backupRegions: ['eu-west'],
        dr: { mode: 'none' },
      });
      expect(
        effectiveResidency({
          region: 'eu-west',
          residency: { processingRegions: ['eu-west', 'eu-central'] },
        }),
      ).to.deep.equal({
        processingRegions: ['eu-west', 'eu-central'],
        backupRegions: ['eu-west'],
        dr: { mode: 'none' },
      });
    });
  });

  describe('failover (checkFailover)', () => {
    const t = (region: string, residency?: ResidencyPolicyInput): ResidencySubject => ({
      region,
      ...(residency ? { residency } : {}),
    });
    const cases: Array<[string, ResidencySubject, string, ResidencyReason[]]> = [
      ['DR none: never, even to a configured standby', t('us-east'), 'us-west', ['dr_none']],
      [
        'DR jurisdiction: a standby in the same jurisdiction',
        t('us-east', { dr: { mode: 'jurisdiction' } }),
        'us-west',
        [],
      ],
      [
        'DR jurisdiction: a standby in another jurisdiction',
        t('us-east', { dr: { mode: 'jurisdiction' } }),
        'eu-west',
        ['dr_other_jurisdiction'],
      ],
      [
        'DR jurisdiction: a same-jurisdiction region the home does not fail over to',
        t('eu-west', { dr: { mode: 'jurisdiction' } }),
        'eu-central',
        [],
      ],
      [
        'DR jurisdiction: a region outside the home region failover list',
        t('eu-central', { dr: { mode: 'jurisdiction' } }),
        'us-east',
        ['not_failover_target', 'dr_other_jurisdiction'],
      ],
      [
        'DR regions: a listed standby, across jurisdictions, where a processing region lies',
        t('us-east', {
          processingRegions: ['us-east', 'eu-central'],
          dr: { mode: 'regions', regions: ['eu-west'] },
        }),
        'eu-west',
        [],
      ],
      [
        'DR regions: a listed standby outside every processing jurisdiction (registered before the check)',
        t('us-east', { dr: { mode: 'regions', regions: ['eu-west'] } }),
        'eu-west',
        ['dr_other_jurisdiction'],
      ],
      [
        'DR regions: a configured standby that is not listed',
        t('us-east', { dr: { mode: 'regions', regions: ['eu-west'] } }),
        'us-west',
        ['dr_not_listed'],
      ],
      [
        'DR regions: a listed region the home does not fail over to',
        t('us-west', {
          processingRegions: ['us-west', 'eu-central'],
          dr: { mode: 'regions', regions: ['eu-west'] },
        }),
        'eu-west',
        ['not_failover_target'],
      ],
      [
        'the home region itself',
        t('us-east', { dr: { mode: 'jurisdiction' } }),
        'us-east',
        ['same_region'],
      ],
      [
        'an unknown region',
        t('us-east', { dr: { mode: 'jurisdiction' } }),
        'ap-south',
        ['unknown_region'],
      ],
    ];
    for (const [name, tenant, target, expected] of cases) {
      it(`${expected.length === 0 ? 'allows' : 'refuses'} ${name}`, () => {
        expect(reasons(checkFailover(tenant, target, MATRIX))).to.deep.equal(expected);
      });
    }
  });

  describe('serving, backups and migration', () => {
    const declared = (region: string) => ({
      region,
      declaredAt: '2025-01-01T00:00:00.000Z',
      by: 'platform-operator:op1',
    });
    const serve: Array<[string, ResidencySubject, string, boolean]> = [
      ['the home region', { region: 'eu-west' }, 'eu-west', true],
      ['another region, no failover', { region: 'eu-west' }, 'us-east', false],
      [
        'a region with a declared, permitted failover',
        {
          region: 'us-east',
          residency: { dr: { mode: 'jurisdiction' } },
          failover: declared('us-west'),
        },
        'us-west',
        true,
      ],
      [
        'a third region while a failover is declared',
        {
          region: 'us-east',
          residency: { dr: { mode: 'jurisdiction' } },
          failover: declared('us-west'),
        },
        'eu-west',
        false,
      ],
      [
        'a declared failover the policy no longer allows',
        { region: 'us-east', residency: { dr: { mode: 'none' } }, failover: declared('us-west') },
        'us-west',
        false,
      ],
      [
        'a home region the (inconsistent) policy does not allow',
        { region: 'us-east', residency: { processingRegions: ['us-west'] } },
        'us-east',
        false,
      ],
    ];
    for (const [name, tenant, region, expected] of serve) {
      it(`${expected ? 'serves' : 'does not serve'} from ${name}`, () => {
        expect(mayServe(tenant, region, MATRIX)).to.equal(expected);
        if (expected) {
          expect(() => {
            assertMayServe(tenant, region, MATRIX);
          }).not.to.throw();
        } else {
          expect(() => {
            assertMayServe(tenant, region, MATRIX);
          }).to.throw(RegionMismatchError);
        }
      });
    }

    it('backs up only to the allowed backup regions', () => {
      expect(mayBackupTo({ region: 'eu-west' }, 'eu-west')).to.equal(true);
      expect(mayBackupTo({ region: 'eu-west' }, 'eu-central')).to.equal(false);
      const t = { region: 'eu-west', residency: { backupRegions: ['eu-central'] } };
      expect(mayBackupTo(t, 'eu-central')).to.equal(true);
      expect(mayBackupTo(t, 'eu-west')).to.equal(false);
      expect(mayBackupTo(t, 'us-east')).to.equal(false);
    });

    const migrate: Array<[string, ResidencySubject, string, ResidencyReason[]]> = [
      [
        'to an allowed processing region',
        { region: 'eu-west', residency: { processingRegions: ['eu-west', 'eu-central'] } },
        'eu-central',
        [],
      ],
      [
        'anywhere under the default policy',
        { region: 'eu-west' },
        'eu-central',
        ['not_processing_region'],
      ],
      [
        'to another jurisdiction not in the policy',
        { region: 'eu-west', residency: { processingRegions: ['eu-west', 'eu-central'] } },
        'us-east',
        ['not_processing_region'],
      ],
      ['to the home region', { region: 'eu-west' }, 'eu-west', ['same_region']],
      [
        'to an unknown region',
        { region: 'eu-west', residency: { processingRegions: ['eu-west', 'ap-south'] } },
        'ap-south',
        ['unknown_region'],
      ],
      [
        'while a failover is active',
        {
          region: 'us-east',
          residency: { processingRegions: ['us-east', 'us-west'], dr: { mode: 'jurisdiction' } },
          failover: declared('us-west'),
        },
        'us-west',
        ['failover_active'],
      ],
    ];
    for (const [name, tenant, target, expected] of migrate) {
      it(`${expected.length === 0 ? 'allows' : 'refuses'} a migration ${name}`, () => {
        expect(reasons(checkMigration(tenant, target, MATRIX))).to.deep.equal(expected);
        expect(mayMigrate(tenant, target, MATRIX)).to.equal(expected.length === 0);
      });
    }
  });

  describe('the tenant registry', () => {
    let dir: string;
    let cp: ControlPlane;
    let issuer: TestIssuer;
    let clock: Date;

    const input = (id: string, region: string, residency?: ResidencyPolicyInput): NewTenant => ({
      id,
      name: `Tenant ${id}`,
      region,
      issuers: [{ iss: `https://ehr-${id}.example.org`, jwks: issuer.publicJwks() }],
      ...(residency ? { residency } : {}),
    });
    const refusals = async () => cp.audit.list({ type: 'residency.refused' });

    before(async () => {
      issuer = await TestIssuer.create({ iss: 'https://ehr.example.org' });
    });

    beforeEach(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
      clock = new Date('2025-03-01T00:00:00Z');
      cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite'), now: () => clock });
    });

    afterEach(async () => {
      await cp.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('stores a policy with the tenant and omits it when the default applies', async () => {
      const eu = await cp.tenants.create(
        input('eu-hospital', 'eu-west', {
          processingRegions: ['eu-west', 'eu-central'],
          dr: { mode: 'jurisdiction' },
        }),
        { regions: MATRIX },
      );
      expect(eu.residency).to.deep.equal({
        processingRegions: ['eu-west', 'eu-central'],
        dr: { mode: 'jurisdiction' },
      });
      expect(await cp.tenants.get('eu-hospital')).to.deep.equal(eu);
      const plain = await cp.tenants.create(input('us-clinic', 'us-east'), { regions: MATRIX });
      expect(plain).not.to.have.property('residency');
      expect(plain).not.to.have.property('failover');
      expect(await refusals()).to.deep.equal([]);
    });

    const forbidden: Array<[string, NewTenant, ResidencyReason[]]> = [
      [
        'a home region its policy does not list',
        { ...stub('eu-hospital', 'us-east'), residency: { processingRegions: ['eu-west'] } },
        ['home_not_processing'],
      ],
      ['an unknown home region', stub('eu-hospital', 'ap-south'), ['unknown_region']],
      [
        'a backup region that does not exist',
        { ...stub('eu-hospital', 'eu-west'), residency: { backupRegions: ['eu-north'] } },
        ['unknown_region'],
      ],
    ];
    function stub(id: string, region: string): NewTenant {
      return { id, name: `Tenant ${id}`, region, issuers: [] };
    }
    for (const [name, raw, expected] of forbidden) {
      it(`refuses to create a tenant with ${name} (ResidencyError), and the registry records residency.refused`, async () => {
        const tenant = { ...raw, issuers: input(raw.id, raw.region).issuers };
        const err = await rejection(
          cp.tenants.create(tenant, { regions: MATRIX, actor: 'platform-operator:op1' }),
        );
        expect(err).to.be.instanceOf(ResidencyError);
        expect(reasons(problemsOf(err))).to.deep.equal(expected);
        expect(await cp.tenants.list()).to.deep.equal([]);
        const events = await refusals();
        expect(events).to.have.length(1);
        expect(events[0]).to.deep.include({
          type: 'residency.refused',
          outcome: 'failure',
          tenant: raw.id,
          actor: 'platform-operator:op1',
        });
        expect(events[0]!.detail).to.deep.include({
          action: 'create',
          region: raw.region,
          reasons: expected.join(','),
        });
      });
    }

    it('refuses malformed policies with InvalidInputError (400) naming the field, unaudited', async () => {
      const bad: Array<[unknown, string]> = [
        [{ processingRegions: [] }, 'residency.processingRegions'],
        [{ processingRegions: ['eu-west', 'eu-west'] }, 'residency.processingRegions[1]'],
        [{ backupRegions: ['EU West'] }, 'residency.backupRegions[0]'],
        [{ dr: { mode: 'anywhere' } }, 'residency.dr.mode'],
        [{ dr: { mode: 'none', regions: ['us-west'] } }, 'residency.dr.regions'],
        [{ dr: { mode: 'regions' } }, 'residency.dr.regions'],
        [{ color: 'red' }, 'residency.color'],
        [JSON.parse('{"__proto__": {"x": 1}}'), 'residency.__proto__'],
        ['eu-only', 'residency'],
      ];
      for (const [residency, field] of bad) {
        const err = await rejection(
          cp.tenants.create({ ...input('acme', 'eu-west'), residency } as NewTenant, {
            regions: MATRIX,
          }),
        );
        expect(err, JSON.stringify(residency)).to.be.instanceOf(InvalidInputError);
        expect(fieldOf(err)).to.equal(field);
      }
      expect(await refusals()).to.deep.equal([]);
    });

    it('refuses a PATCH whose policy forbids the current home, audited, leaving the tenant unchanged', async () => {
      const before = await cp.tenants.create(input('eu-hospital', 'eu-west'), { regions: MATRIX });
      const err = await rejection(
        cp.tenants.update(
          'eu-hospital',
          { residency: { processingRegions: ['eu-central'] } },
          { regions: MATRIX, actor: 'tenant-admin:ta1' },
        ),
      );
      expect(err).to.be.instanceOf(ResidencyError);
      expect(await cp.tenants.get('eu-hospital')).to.deep.equal(before);
      const [event] = await refusals();
      expect(event).to.deep.include({ tenant: 'eu-hospital', actor: 'tenant-admin:ta1' });
      expect(event!.detail).to.deep.include({ action: 'update', reasons: 'home_not_processing' });

      const widened = await cp.tenants.update(
        'eu-hospital',
        { residency: { processingRegions: ['eu-west', 'eu-central'] } },
        { regions: MATRIX },
      );
      expect(widened.residency).to.deep.equal({ processingRegions: ['eu-west', 'eu-central'] });
      const reset = await cp.tenants.update(
        'eu-hospital',
        { residency: null },
        { regions: MATRIX },
      );
      expect(reset).not.to.have.property('residency');
    });

    it('declares a permitted failover (audited with the change), serves from it, and clears it', async () => {
      await cp.tenants.create(input('us-clinic', 'us-east', { dr: { mode: 'jurisdiction' } }), {
        regions: MATRIX,
      });
      clock = new Date('2025-03-02T00:00:00Z');
      const t = await cp.tenants.declareFailover('us-clinic', 'us-west', {
        regions: MATRIX,
        actor: 'platform-operator:op1',
      });
      expect(t.failover).to.deep.equal({
        region: 'us-west',
        declaredAt: '2025-03-02T00:00:00.000Z',
        by: 'platform-operator:op1',
      });
      expect(mayServe(t, 'us-west', MATRIX)).to.equal(true);
      expect(mayServe(t, 'us-east', MATRIX)).to.equal(true);
      expect(mayServe(t, 'eu-west', MATRIX)).to.equal(false);
      // Declaring it again changes nothing.
      expect(
        await cp.tenants.declareFailover('us-clinic', 'us-west', { regions: MATRIX }),
      ).to.deep.equal(t);
      const declaredEvents = await cp.audit.list({ type: 'residency.failover.declared' });
      expect(declaredEvents).to.have.length(1);
      expect(declaredEvents[0]).to.deep.include({
        tenant: 'us-clinic',
        actor: 'platform-operator:op1',
      });
      expect(declaredEvents[0]!.detail).to.deep.equal({ region: 'us-east', target: 'us-west' });

      // The policy cannot be narrowed under an active failover, and no second failover.
      const narrowed = await rejection(
        cp.tenants.update(
          'us-clinic',
          { residency: { dr: { mode: 'none' } } },
          { regions: MATRIX },
        ),
      );
      expect(reasons(problemsOf(narrowed))).to.deep.equal(['failover_not_allowed']);
      const second = await rejection(
        cp.tenants.declareFailover('us-clinic', 'eu-west', { regions: MATRIX }),
      );
      expect(reasons(problemsOf(second))).to.include('failover_active');

      const cleared = await cp.tenants.clearFailover('us-clinic', {
        actor: 'platform-operator:op1',
      });
      expect(cleared).not.to.have.property('failover');
      expect(mayServe(cleared, 'us-west', MATRIX)).to.equal(false);
      expect(await cp.audit.list({ type: 'residency.failover.cleared' })).to.have.length(1);
      expect(await cp.tenants.clearFailover('us-clinic')).to.deep.equal(cleared);
      expect(await cp.audit.list({ type: 'residency.failover.cleared' })).to.have.length(1);
    });

    const failovers: Array<[string, ResidencyPolicyInput | undefined, string, ResidencyReason[]]> =
      [
        ['with DR none', undefined, 'us-west', ['dr_none']],
        [
          'to another jurisdiction under DR jurisdiction',
          { dr: { mode: 'jurisdiction' } },
          'eu-west',
          ['dr_other_jurisdiction'],
        ],
        [
          'to a region the home does not fail over to',
          {
            processingRegions: ['us-east', 'eu-west'],
            dr: { mode: 'regions', regions: ['eu-central'] },
          },
          'eu-central',
          ['not_failover_target'],
        ],
      ];
    for (const [name, residency, target, expected] of failovers) {
      it(`refuses a failover ${name}, audited, leaving no failover`, async () => {
        await cp.tenants.create(input('us-clinic', 'us-east', residency), { regions: MATRIX });
        const err = await rejection(
          cp.tenants.declareFailover('us-clinic', target, {
            regions: MATRIX,
            actor: 'platform-operator:op1',
          }),
        );
        expect(err).to.be.instanceOf(ResidencyError);
        expect(reasons(problemsOf(err))).to.deep.equal(expected);
        const t = await cp.tenants.get('us-clinic');
        expect(t).not.to.have.property('failover');
        expect(mayServe(t, target, MATRIX)).to.equal(false);
        const [event] = await refusals();
        expect(event!.detail).to.deep.include({ action: 'failover', region: 'us-east', target });
      });
    }

    it('refuses a malformed failover target as input (400), not as policy', async () => {
      await cp.tenants.create(input('us-clinic', 'us-east'), { regions: MATRIX });
      const err = await rejection(
        cp.tenants.declareFailover('us-clinic', 'US West; drop', { regions: MATRIX }),
      );
      expect(err).to.be.instanceOf(InvalidInputError);
      expect(fieldOf(err)).to.equal('target');
      expect(await refusals()).to.deep.equal([]);
    });

    it('moves the home region only to an allowed processing region (migration commit point)', async () => {
      await cp.tenants.create(
        input('eu-hospital', 'eu-west', { processingRegions: ['eu-west', 'eu-central'] }),
        {
          regions: MATRIX,
        },
      );
      const refused = await rejection(
        cp.tenants.moveHome('eu-hospital', 'us-east', {
          regions: MATRIX,
          actor: 'platform-operator:op1',
        }),
      );
      expect(reasons(problemsOf(refused))).to.deep.equal(['not_processing_region']);
      expect((await cp.tenants.get('eu-hospital')).region).to.equal('eu-west');
      const [event] = await refusals();
      expect(event!.detail).to.deep.include({
        action: 'migrate',
        region: 'eu-west',
        target: 'us-east',
      });

      const moved = await cp.tenants.moveHome('eu-hospital', 'eu-central', {
        regions: MATRIX,
        actor: 'platform-operator:op1',
      });
      expect(moved.region).to.equal('eu-central');
      expect(mayServe(moved, 'eu-central', MATRIX)).to.equal(true);
      expect(mayServe(moved, 'eu-west', MATRIX)).to.equal(false);
      const [movedEvent] = await cp.audit.list({ type: 'residency.home.moved' });
      expect(movedEvent).to.deep.include({ tenant: 'eu-hospital', actor: 'platform-operator:op1' });
      expect(movedEvent!.detail).to.deep.equal({ from: 'eu-west', to: 'eu-central' });
    });

    it('adds the residency columns to a control plane created before them; old rows get the default', async () => {
      await cp.tenants.create(input('old-tenant', 'eu-west'));
      await cp.close();
      const db = new sqlite3.Database(path.join(dir, 'control.sqlite'));
      const run = (sql: string) =>
        new Promise<void>((resolve, reject) => {
          db.run(sql, (err) => {
            if (err) {
              reject(err);
            } else {
              resolve();
            }
          });
        });
      await run('ALTER TABLE tenants DROP COLUMN residency');
      await run('ALTER TABLE tenants DROP COLUMN failover');
      await new Promise<void>((resolve) => {
        db.close(() => {
          resolve();
        });
      });
      cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite'), now: () => clock });
      const old = await cp.tenants.get('old-tenant');
      expect(old).not.to.have.property('residency');
      expect(effectiveResidency(old).processingRegions).to.deep.equal(['eu-west']);
      const updated = await cp.tenants.update(
        'old-tenant',
        { residency: { backupRegions: ['eu-central'] } },
        { regions: MATRIX },
      );
      expect(updated.residency).to.deep.equal({ backupRegions: ['eu-central'] });
    });
  });
});
