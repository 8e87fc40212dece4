/**
 * Shared fixture access for the content specs (patient bundles, shipped pack expressions).
 * Reads only spec/fixtures/ (never /work/shared).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures');
export const SYNTHEA_DIR = path.join(FIXTURES, 'synthea-r4');

export interface ManifestPatient {
  file: string;
  patient_id: string;
  deceased: boolean;
  last_encounter: string;
  age_at_last_encounter: number;
  rule_hints: string[];
  active_medications: Array<{ rxnorm: string; display: string }>;
}

export function readJson(file: string): unknown {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
}

export function syntheaManifest(): ManifestPatient[] {
  return (readJson(path.join(SYNTHEA_DIR, 'manifest.json')) as { patients: ManifestPatient[] })
    .patients;
}

/** The manifest entry whose file name starts with `name` (e.g. `Derek_Becker`). */
export function syntheaPatient(name: string): ManifestPatient {
  const found = syntheaManifest().find((p) => p.file.startsWith(`${name}_`));
  if (!found) {
    throw new Error(`no Synthea fixture for ${name}`);
  }
  return found;
}

export function syntheaBundle(name: string): unknown {
  return readJson(path.join(SYNTHEA_DIR, syntheaPatient(name).file));
}
