package org.qdedup.image;

import com.github.luben.zstd.ZstdDecompressCtx;
import java.util.zip.DataFormatException;
import java.util.zip.Inflater;
import org.qdedup.format.Header;

/** Decompression of one qcow2 compressed cluster: zlib (raw deflate) or zstd (one or more frames). */
final class Compression {
    private Compression() {
    }

    /**
     * Decompresses {@code src[0..srcLen)} into exactly {@code dst.length} bytes; trailing input bytes are ignored.
     *
     * @return null on success, else what is wrong
     */
    static String decompress(int type, byte[] src, int srcLen, byte[] dst) {
        return type == Header.COMPRESSION_ZSTD ? zstd(src, srcLen, dst) : zlib(src, srcLen, dst);
    }

    /**
     * Compresses one cluster as QEMU stores it, or returns null. zlib output is raw deflate that QEMU's inflate with
     * a 4 KiB window (windowBits -12) can read: no match reaches 4 KiB back (see the block loop).
     */
    static byte[] compress(int type, byte[] src) {
        if (type == Header.COMPRESSION_ZSTD) {
            return com.github.luben.zstd.Zstd.compress(src, 3);
        }
        java.util.zip.Deflater d = new java.util.zip.Deflater(java.util.zip.Deflater.DEFAULT_COMPRESSION, true);
        try {
            // Output larger than the cluster is of no use: the caller then stores the cluster uncompressed.
            byte[] out = new byte[src.length];
            int outLen = 0;
            // Blocks of 2 KiB, each primed with the 2 KiB before it: no match reaches back 4 KiB or more.
            final int block = 2048;
            for (int off = 0; off < src.length; off += block) {
                if (off > 0) {
                    d.setDictionary(src, off - block, block);
                }
                d.setInput(src, off, Math.min(block, src.length - off));
                if (off + block >= src.length) {
                    d.finish();
                    while (!d.finished()) {
                        if (outLen == out.length) {
                            return null;
                        }
                        outLen += d.deflate(out, outLen, out.length - outLen, java.util.zip.Deflater.NO_FLUSH);
                    }
                } else {
                    int space;
                    int n;
                    do {
                        space = out.length - outLen;
                        if (space == 0) {
                            return null;
                        }
                        n = d.deflate(out, outLen, space, java.util.zip.Deflater.FULL_FLUSH);
                        outLen += n;
                    } while (n == space);
                }
            }
            return java.util.Arrays.copyOf(out, outLen);
        } finally {
            d.end();
        }
    }

    private static String zlib(byte[] src, int srcLen, byte[] dst) {
        Inflater inf = new Inflater(true);
        try {
            inf.setInput(src, 0, srcLen);
            int got = 0;
            while (got < dst.length) {
                int n = inf.inflate(dst, got, dst.length - got);
                got += n;
                if (n == 0 && (inf.finished() || inf.needsInput() || inf.needsDictionary())) {
                    break;
                }
            }
            return got == dst.length ? null : "zlib stream ends after " + got + " of " + dst.length + " bytes";
        } catch (DataFormatException e) {
            return "zlib data corrupt (" + e.getMessage() + ")";
        } finally {
            inf.end();
        }
    }

    private static String zstd(byte[] src, int srcLen, byte[] dst) {
        // Frames follow each other with no length prefix: decode frame after frame until the cluster is full.
        try (ZstdDecompressCtx ctx = new ZstdDecompressCtx()) {
            int in = 0, out = 0;
            while (out < dst.length) {
                if (in >= srcLen) {
                    return "zstd data ends after " + out + " of " + dst.length + " bytes";
                }
                long frameSize;
                try {
                    frameSize = com.github.luben.zstd.Zstd.findFrameCompressedSize(src, in, srcLen - in);
                } catch (RuntimeException e) {
                    // zstd-jni throws ZstdException for a bad frame header instead of returning an error code
                    return "zstd frame at byte " + in + " corrupt (" + e.getMessage() + ")";
                }
                if (com.github.luben.zstd.Zstd.isError(frameSize)) {
                    return "zstd frame at byte " + in + " corrupt (" + com.github.luben.zstd.Zstd.getErrorName(frameSize) + ")";
                }
                int n;
                try {
                    n = ctx.decompressByteArray(dst, out, dst.length - out, src, in, (int) frameSize);
                } catch (RuntimeException e) {
                    return "zstd frame at byte " + in + " corrupt (" + e.getMessage() + ")";
                }
                out += n;
                in += (int) frameSize;
                ctx.reset();
            }
            return null;
        }
    }
}
