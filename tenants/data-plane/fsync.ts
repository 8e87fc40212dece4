/** Durability helper of the data plane's file writes. */
import fs from 'node:fs';

/**
 * fsyncs a file or a folder: after a rename or a new file in a folder, fsync the folder, or a
 * power cut may lose the entry although the file's data was synced.
 */
export function fsyncPath(p: string): void {
  const fd = fs.openSync(p, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
