"""Every constant of the on-storage format, defined once. ``SPEC.md`` documents each of them.

Changing a value here changes the format: bump the matching version and keep a reader for the
old one.
"""

import struct

# --- the format blob -----------------------------------------------------------------------
FORMAT_BLOB_NAME = "kdist.repository"
FORMAT_MAGIC = b"KDISTREP"
FORMAT_VERSION = 2  # what `repo create` writes by default: 2 adds the root signing key and key slots
# 1: one password, unsigned manifests (kdist repo upgrade makes it 2); 3: hosts kept apart
FORMAT_VERSIONS_READ = (1, 2, 3)
FORMAT_VERSION_CONVERGENT = 3  # `repo create --format-version 3` (SPEC.md sections 4a, 8a): per-host confidentiality
FORMAT_VERSIONS_CREATED = (2, 3)  # what `repo create --format-version` offers
REFERENCE_SIZES = (32, 64)  # a content reference: its id (formats 1, 2), or its id and seed (format 3)
# magic(8) | version u16 | header length u32 ; then header (msgpack), then checksum (32)
FORMAT_PREAMBLE = struct.Struct(">8sHI")
FORMAT_CHECKSUM_SIZE = 32  # BLAKE3 (unkeyed) of everything before it: tells damage from a wrong password

# --- keys ----------------------------------------------------------------------------------
MASTER_KEY_SIZE = 32
HASH_SECRET_SIZE = 32
KEY_WRAP_NONCE_SIZE = 12
# HKDF-SHA256 "info" strings, one per purpose
HKDF_INFO_CONTENT = b"kdist/v1/content-encryption"
HKDF_INFO_INDEX = b"kdist/v1/index-encryption"
HKDF_INFO_MANIFEST = b"kdist/v1/manifest-encryption"
HKDF_INFO_HASH = b"kdist/v1/content-hash"
HKDF_INFO_CHUNKER = b"kdist/v1/chunker-seed"
HKDF_INFO_NAME = b"kdist/v1/blob-name"
HKDF_INFO_RECORD_ID = b"kdist/v3/record-id"  # format 3 content ids (repo_format.convergent)
HKDF_INFO_CONVERGENCE = b"kdist/v3/convergence"  # format 3 seeds: the keyed hash of a plaintext
HKDF_INFO_LOCAL_CACHE = b"kdist/v1/local-cache"  # MAC of the files of the local cache (not a repository blob)

# --- algorithms ----------------------------------------------------------------------------
AEAD_AES_256_GCM = "aes-256-gcm"
AEAD_CHACHA20_POLY1305 = "chacha20-poly1305"
AEAD_ALGORITHMS = (AEAD_AES_256_GCM, AEAD_CHACHA20_POLY1305)
AEAD_NONCE_SIZE = 12
AEAD_TAG_SIZE = 16
HASH_BLAKE3_KEYED = "blake3-keyed-256"
CONTENT_ID_SIZE = 32

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_NONE: "none", COMPRESSION_ZSTD: "zstd"}

KDF_SCRYPT = "scrypt"

# --- blob names ----------------------------------------------------------------------------
DATA_PACK_PREFIX = "p"
METADATA_PACK_PREFIX = "q"
INDEX_PREFIX = "xn"
SESSION_PREFIX = "s"
MANIFEST_PREFIX = "m"
MANIFEST_COMPACTED_PREFIX = "m_"  # a manifest blob written by compaction
KEY_SLOT_PREFIX = "ks"  # ks<key id> (not "k": the format blob is "kdist.repository"): one password's sealed keys and role (format version 2)
PACK_PREFIXES = (DATA_PACK_PREFIX, METADATA_PACK_PREFIX)  # every pack is one or the other
SESSION_ID_BYTES = 8
PACK_RANDOM_BYTES = 16

# --- packs ---------------------------------------------------------------------------------
PACK_MAGIC = b"KDPK"
PACK_VERSION = 1
# magic(4) | version u8 | reserved(3) | local index offset u64 | local index length u32 | crc32 u32
PACK_POSTAMBLE = struct.Struct(">4sB3xQII")

# --- index blobs ---------------------------------------------------------------------------
INDEX_MAGIC = b"KDIX"
INDEX_VERSION = 1
# magic(4) | version u8 | flags u8 | reserved u16 | entry count u32 | pack count u32
INDEX_HEADER = struct.Struct(">4sBBHII")
INDEX_PACK_NAME_LENGTH = struct.Struct(">H")
# content id(32) | pack number u32 | offset u32 | packed length u32 | original length u32 |
# compression u8 | flags u8 | reserved u16 | timestamp i64 (microseconds since the Unix epoch)
INDEX_ENTRY = struct.Struct(">32sIIIIBBHq")
INDEX_FLAG_DELETED = 0x01
MAX_INDEX_ENTRIES = 50_000_000
MAX_PACK_NAME_LENGTH = 200

# --- objects -------------------------------------------------------------------------------
INDIRECT_OBJECT_PREFIX = "I"
OBJECT_LIST_VERSION = 1
OBJECT_LIST_VERSION_HOLES = 2  # a list holding holes ([nil, length]): kdist before them refuses it

# --- epochs, sessions, maintenance (gc/README.md) -----------------------------------------
EPOCH_MARKER_PREFIX = "xe"
COMPACTED_PREFIX = "xs"  # xs<epoch>_<set id>_<member>of<count>
RANGE_PREFIX = "xr"  # xr<last epoch>_<set id>_<member>of<count>: every epoch 0..last
PROBE_PREFIX = "xt"  # short-lived blobs that read the storage's clock
SET_SIGNATURE_INFIX = "_sig"  # xs<epoch>_<set id>_sig<16 hex>: a set's signature, put after its members
SIGNED_SETS_PREFIX = "xv_"  # xv_<16 hex>: once listed, a set counts only if signed
# the first letter of INDEX_PREFIX and of every prefix above: one listing finds all the blobs
# of the index and its epochs (probes too, which the index ignores)
INDEX_FAMILY_PREFIX = "x"
INDEX_BLOB_MAX_ENTRIES = 200_000  # compaction splits its output into blobs of at most this many
