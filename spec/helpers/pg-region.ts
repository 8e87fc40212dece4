/**
 * A test app's region on a PostgreSQL database of its own (created for the spec, dropped
 * after it), so specs never share stores, keyring bindings or schemas. Needs
 * CELLCDS_TEST_PG_URL.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Sequelize } from 'sequelize';
import { PUBLIC_URL } from './test-app.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;

/** A database made for one spec: its URL, and `drop` for the spec's `after`. */
export interface SpecDatabase {
  url: string;
  drop(): Promise<void>;
}

async function asRoot(sql: string): Promise<void> {
  const root = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false });
  try {
    await root.query(sql);
  } finally {
    await root.close();
  }
}

/** Creates `cellcds_spec_<label>_<random>` on the test server. */
export async function createSpecDatabase(label: string): Promise<SpecDatabase> {
  const name = `cellcds_spec_${label}_${crypto.randomBytes(4).toString('hex')}`;
  await asRoot(`CREATE DATABASE "${name}"`);
  const url = new URL(PG_URL ?? '');
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    drop: () => asRoot(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`),
  };
}

/**
 * Writes `<dir>/regions.json` with one region `r1` whose stores are in `postgresUrl` (keys and
 * backups under `dir`), and returns the environment that selects it.
 */
export function regionEnv(dir: string, postgresUrl: string): Record<string, string> {
  const regions = path.join(dir, 'regions.json');
  fs.writeFileSync(
    regions,
    JSON.stringify({
      regions: [
        {
          id: 'r1',
          jurisdiction: 'US',
          publicUrl: PUBLIC_URL,
          storage: { postgresUrl },
          backupDir: path.join(dir, 'backups'),
          keyProvider: { kind: 'local-keyring', dir: path.join(dir, 'keys') },
        },
      ],
    }),
  );
  return { CELLCDS_REGIONS_FILE: regions, CELLCDS_REGION: 'r1' };
}
