/**
 * The embedded demo: on first start, a demo tenant, a demo EHR issuer key pair and the
 * shipped medication-safety pack, subscribed. The issuer's private key is written (0600) to
 * the data directory so `cellcds call ... --demo` can sign requests like an EHR would.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import jose from 'node-jose';
import { parsePackText, resolvePackFiles } from '../rules/index.ts';
import type { ControlPlane, Principal } from '../tenants/index.ts';
import type { AdminService } from './admin-service.ts';

export const DEMO_TENANT = 'demo';
export const DEMO_ISSUER = 'https://ehr.demo.cellcds.example';
export const DEMO_KEY_FILE = path.join('demo', 'ehr-issuer.private.jwk.json');

const here = path.dirname(fileURLToPath(import.meta.url));
/** The shipped pack the demo tenant subscribes to. */
export const SHIPPED_PACK_FILE = path.resolve(here, '../rules/packs/medication-safety/pack.yaml');

const SEED_PRINCIPAL: Principal = { tokenId: 'seed', role: 'platform-operator' };

/** Reads and resolves a pack file (YAML or JSON) the way `pack push` would upload it. */
export function readPackFile(file: string): unknown {
  const text = fs.readFileSync(file, 'utf8');
  const raw = parsePackText(text, /\.ya?ml$/i.test(file) ? 'yaml' : 'json');
  return resolvePackFiles(raw, path.dirname(file));
}

/**
 * When the demo tenant was deprovisioned (its id is retired: never registered again), or
 * undefined.
 */
export async function demoRetiredAt(controlPlane: ControlPlane): Promise<string | undefined> {
  return controlPlane.tenants.retiredAt?.(DEMO_TENANT);
}

/**
 * Seeds the demo tenant if it does not exist yet and was never deprovisioned. Idempotent.
 * @returns true if it seeded now.
 */
export async function seedDemo(opts: {
  dataDir: string;
  region: string;
  controlPlane: ControlPlane;
  admin: AdminService;
}): Promise<boolean> {
  const existing = await opts.controlPlane.tenants.list();
  // A deprovisioned demo's id is retired: registering it again would be refused, after its
  // EHR key file had been overwritten.
  if (existing.some((t) => t.id === DEMO_TENANT) || (await demoRetiredAt(opts.controlPlane))) {
    return false;
  }
  const keystore = jose.JWK.createKeyStore();
  const key = await keystore.generate('EC', 'P-384', {
    alg: 'ES384',
    use: 'sig',
    kid: 'demo-ehr-es384',
  });
  const keyFile = path.join(opts.dataDir, DEMO_KEY_FILE);
  fs.mkdirSync(path.dirname(keyFile), { recursive: true, mode: 0o700 });
  fs.writeFileSync(keyFile, JSON.stringify(key.toJSON(true), null, 2), { mode: 0o600 });

  const uploaded = await opts.admin.uploadPack(SEED_PRINCIPAL, readPackFile(SHIPPED_PACK_FILE));
  await opts.admin.createTenant(SEED_PRINCIPAL, {
    id: DEMO_TENANT,
    name: 'Demo Health System',
    region: opts.region,
    issuers: [{ iss: DEMO_ISSUER, jwks: { keys: [key.toJSON(false)] } }],
    fhirServers: [],
  });
  await opts.admin.setSubscriptions(SEED_PRINCIPAL, DEMO_TENANT, [
    { pack: uploaded.id, version: uploaded.version },
  ]);
  return true;
}
