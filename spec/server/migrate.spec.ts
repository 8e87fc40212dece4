import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { parseRegionMatrix } from '../../server/regions.ts';
import type { RegionMatrix } from '../../server/regions.ts';
import { runMigration } from '../../server/migrate.ts';
import {
  KeyUnavailableError,
  ResidencyError,
  createLocalKeyProvider,
  openControlPlane,
  openRegionStores,
  readMigrationState,
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

  /**
   * What `cellcds serve --region ID` does at its first start: makes the region's keyring and
   * binds the region's stores to it. Only a server does; `cellcds migrate` refuses a region no
   * server opened yet.
   */
  async function serveOnce(id: string): Promise<void> {
    const r = await openRegion(id);
    await r.stores.close();
  }

  const targetKeyring = () => path.join(dir, 'eu-west/keys/eu-west.keyring.json');
  const targetBinding = () => path.join(dir, 'eu-west/data/eu-west/.keyring-binding.json');
  const targetCheckpoints = () => path.join(dir, 'eu-west/backups/migrations');

  async function seed(
    residency?: ResidencyPolicyInput,
    { targetServed = true }: { targetServed?: boolean } = {},
  ): Promise<void> {
    if (targetServed) {
      await serveOnce('eu-west');
    }
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

  describe('a target region no server opened yet', () => {
    async function refused(): Promise<KeyUnavailableError> {
      const err = await runMigration({
        controlPlane: cp,
        matrix,
        tenant: TENANT,
        to: 'eu-west',
      }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(KeyUnavailableError);
      const message = (err as Error).message;
      expect(message)
        .to.include('eu-west')
        .and.match(/start the region's servers once/i);
      return err as KeyUnavailableError;
    }

    /** Refused before anything moved: the tenant serves from its home, unsuspended. */
    async function nothingMoved(): Promise<void> {
      expect(fs.existsSync(targetBinding())).to.equal(false);
      expect(fs.existsSync(targetCheckpoints())).to.equal(false);
      expect(await cp.tenants.get(TENANT)).to.include({ region: 'us-east', status: 'active' });
      const types = (await cp.audit.list({ tenant: TENANT })).map((e) => e.type);
      expect(types).to.not.include('migration.started');
      const us = await openRegion('us-east');
      await us.stores.store(TENANT).readInvocation('inv-2');
      await us.stores.close();
    }

    it("refuses when this host's keyring folder for it is missing or empty, and creates no keyring there", async () => {
      await seed({ processingRegions: ['us-east', 'eu-west'] }, { targetServed: false });
      const keyDir = path.dirname(targetKeyring());
      const missing = await refused();
      expect(missing.message).to.include(targetKeyring());
      expect(fs.existsSync(keyDir)).to.equal(false);
      await nothingMoved();

      fs.mkdirSync(keyDir, { recursive: true, mode: 0o700 });
      const empty = await refused();
      expect(empty.message).to.include(targetKeyring());
      expect(fs.readdirSync(keyDir)).to.deep.equal([]);
      await nothingMoved();
    });

    it('refuses to make its first keyring binding with a keyring the host holds, then migrates once a server opened the region', async () => {
      await seed({ processingRegions: ['us-east', 'eu-west'] }, { targetServed: false });
      // A keyring this host holds for eu-west: the command cannot tell it is the one the
      // region's servers will use, so it does not bind the region to it.
      await createLocalKeyProvider({ keyDir: path.dirname(targetKeyring()), region: 'eu-west' });
      const err = await refused();
      expect(err.reason, err.message).to.equal('keyring_unbound');
      expect(err.message).to.include('no keyring binding yet').and.include(targetKeyring());
      await nothingMoved();

      await serveOnce('eu-west');
      const result = await runMigration({
        controlPlane: cp,
        matrix,
        tenant: TENANT,
        to: 'eu-west',
      });
      expect(result.tenant).to.include({ region: 'eu-west', status: 'active' });
      expect(result.migration).to.include({ phase: 'done', verifiedRecords: 2 });
    });

    it('refuses to resume a checkpointed migration once the keyring folder is gone, keeping the checkpoint, and resumes when it is back', async () => {
      await seed({ processingRegions: ['us-east', 'eu-west'] });
      await runMigration({
        controlPlane: cp,
        matrix,
        tenant: TENANT,
        to: 'eu-west',
        onProgress: (p) => {
          if (p.phase === 'copied') {
            throw new Error('operator host lost power');
          }
        },
      }).catch(() => undefined);
      const checkpoint = readMigrationState(targetCheckpoints(), TENANT);
      expect(checkpoint?.phase).to.equal('copied');
      const keyDir = path.dirname(targetKeyring());
      const away = path.join(dir, 'keys-away');
      fs.renameSync(keyDir, away);

      await refused();
      expect(fs.existsSync(keyDir)).to.equal(false);
      expect(readMigrationState(targetCheckpoints(), TENANT)).to.deep.equal(checkpoint);
      expect(await cp.tenants.get(TENANT)).to.include({ region: 'us-east', status: 'suspended' });
      expect(await cp.audit.list({ tenant: TENANT, type: 'migration.resumed' })).to.have.length(0);

      fs.renameSync(away, keyDir);
      const result = await runMigration({
        controlPlane: cp,
        matrix,
        tenant: TENANT,
        to: 'eu-west',
      });
      expect(result.tenant).to.include({ region: 'eu-west', status: 'active' });
      expect(result.migration).to.include({ phase: 'done', resumed: true });
    });
  });
});
