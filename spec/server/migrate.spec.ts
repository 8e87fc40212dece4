import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { parseRegionMatrix } from '../../server/regions.ts';
import type { RegionMatrix } from '../../server/regions.ts';
import { runMigration } from '../../server/migrate.ts';
import {
  ResidencyError,
  createLocalKeyProvider,
  openControlPlane,
  openRegionStores,
} from '../../tenants/index.ts';
import type { ControlPlane, ResidencyPolicyInput } from '../../tenants/index.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';

const TENANT = 'acme-health';
const MARKER = 'MIGRSRV-patient-Jane-Doe';

describe('cellcds migrate (server/migrate.ts)', () => {
  let dir: string;
  let matrix: RegionMatrix;
  let cp: ControlPlane;
  let issuer: TestIssuer;

  before(async () => {
    issuer = await TestIssuer.create({ iss: 'https://ehr.example.org' });
  });

  async function openRegion(id: string) {
    const region = matrix.regions.find((r) => r.id === id);
    if (!region || region.storage.kind !== 'sqlite') {
      throw new Error(`no sqlite region ${id}`);
    }
    const keyProvider = await createLocalKeyProvider({
      keyDir: region.keyProvider.dir,
      region: id,
    });
    const stores = await openRegionStores({
      region: id,
      dataDir: region.storage.dataDir,
      keyProvider,
    });
    return { keyProvider, stores, region };
  }

  async function seed(residency?: ResidencyPolicyInput): Promise<void> {
    await cp.tenants.create(
      {
        id: TENANT,
        name: 'Acme Health',
        region: 'us-east',
        issuers: [{ iss: 'https://ehr.example.org', jwks: issuer.publicJwks() }],
        ...(residency ? { residency } : {}),
      },
      { regions: matrix.regions },
    );
    const us = await openRegion('us-east');
    await us.stores.store(TENANT).saveInvocation(invocation('inv-1', MARKER));
    await us.stores.store(TENANT).saveInvocation(invocation('inv-2', MARKER));
    await us.stores.close();
  }

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
    const region = (id: string, jurisdiction: string) => ({
      id,
      jurisdiction,
      publicUrl: `https://${id}.cds.example.org`,
      storage: { dataDir: `${id}/data` },
      backupDir: `${id}/backups`,
      keyProvider: { kind: 'local-keyring', dir: `${id}/keys` },
    });
    matrix = parseRegionMatrix(
      { regions: [region('us-east', 'US'), region('eu-west', 'EU')] },
      'spec',
      dir,
    );
    cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite') });
  });

  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('moves an allowed tenant: home region, data and keys, audited, then resumes the tenant', async () => {
    await seed({ processingRegions: ['us-east', 'eu-west'] });
    const phases: string[] = [];
    const result = await runMigration({
      controlPlane: cp,
      matrix,
      tenant: TENANT,
      to: 'eu-west',
      actor: 'platform-operator:op1',
      onProgress: (p) => {
        phases.push(p.phase);
      },
    });
    expect(result.tenant).to.include({ region: 'eu-west', status: 'active' });
    expect(result.migration).to.include({ phase: 'done', verifiedRecords: 2 });
    expect(phases.at(-1)).to.equal('done');
    const types = (await cp.audit.list({ tenant: TENANT })).map((e) => e.type);
    expect(types).to.include.members([
      'migration.started',
      'residency.home.moved',
      'migration.completed',
    ]);
    expect(types.indexOf('residency.home.moved')).to.be.lessThan(
      types.indexOf('migration.completed'),
    );

    const eu = await openRegion('eu-west');
    const rec = await eu.stores.store(TENANT).readInvocation('inv-1');
    expect(JSON.stringify(rec.secret)).to.include(MARKER);
    await eu.stores.close();
    const us = await openRegion('us-east');
    expect(await us.stores.listTenants()).to.deep.equal([]);
    expect(await us.keyProvider.hasTenantKey(TENANT)).to.equal(false);
    await us.stores.close();
  });

  it('refuses a migration the residency policy forbids before anything moves, and audits it', async () => {
    await seed(); // default policy: processing in us-east only
    const err = await runMigration({
      controlPlane: cp,
      matrix,
      tenant: TENANT,
      to: 'eu-west',
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).to.be.instanceOf(ResidencyError);
    const refusals = await cp.audit.list({ tenant: TENANT, type: 'residency.refused' });
    expect(refusals).to.have.length(1);
    expect(refusals[0]?.detail).to.include({ action: 'migrate', target: 'eu-west' });
    expect(await cp.tenants.get(TENANT)).to.include({ region: 'us-east', status: 'active' });
    // Nothing in the target: no store, no tenant key, no checkpoint; the source still serves.
    const eu = await openRegion('eu-west');
    expect(await eu.stores.listTenants()).to.deep.equal([]);
    expect(await eu.keyProvider.hasTenantKey(TENANT)).to.equal(false);
    expect(fs.existsSync(path.join(eu.region.backupDir, 'migrations'))).to.equal(false);
    await eu.stores.close();
    const us = await openRegion('us-east');
    await us.stores.store(TENANT).readInvocation('inv-2');
    await us.stores.close();
  });

  it('refuses an unknown target region and a migration to the home region', async () => {
    await seed({ processingRegions: ['us-east', 'eu-west'] });
    for (const to of ['us-east', 'ap-south']) {
      const err = await runMigration({ controlPlane: cp, matrix, tenant: TENANT, to }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err, to).to.be.instanceOf(ResidencyError);
    }
    const refusals = await cp.audit.list({ tenant: TENANT, type: 'residency.refused' });
    expect(refusals.map((e) => String(e.detail?.reasons).split(',')[0])).to.deep.equal([
      'same_region',
      'unknown_region',
    ]);
    expect(await cp.tenants.get(TENANT)).to.include({ region: 'us-east', status: 'active' });
  });

  it('leaves the tenant suspended after a failure and finishes on the next run', async () => {
    await seed({ processingRegions: ['us-east', 'eu-west'] });
    const err = await runMigration({
      controlPlane: cp,
      matrix,
      tenant: TENANT,
      to: 'eu-west',
      onProgress: (p) => {
        if (p.phase === 'copied') {
          throw new Error('operator host lost power');
        }
      },
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).to.be.instanceOf(Error);
    expect(await cp.tenants.get(TENANT)).to.include({ region: 'us-east', status: 'suspended' });
    const failed = await cp.audit.list({ tenant: TENANT, type: 'migration.failed' });
    expect(failed[0]?.detail).to.include({ phase: 'copied' });

    const result = await runMigration({ controlPlane: cp, matrix, tenant: TENANT, to: 'eu-west' });
    expect(result.tenant).to.include({ region: 'eu-west', status: 'active' });
    expect(result.migration).to.include({ phase: 'done', resumed: true });
    expect(await cp.audit.list({ tenant: TENANT, type: 'migration.resumed' })).to.have.length(1);
  });

  it('keeps a tenant that was suspended before the migration suspended', async () => {
    await seed({ processingRegions: ['us-east', 'eu-west'] });
    await cp.tenants.update(TENANT, { status: 'suspended' });
    const result = await runMigration({ controlPlane: cp, matrix, tenant: TENANT, to: 'eu-west' });
    expect(result.tenant).to.include({ region: 'eu-west', status: 'suspended' });
  });
});
