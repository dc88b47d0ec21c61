package org.qdedup.image;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.ClosedChannelException;
import java.nio.channels.NonWritableChannelException;
import java.nio.channels.SeekableByteChannel;

/**
 * A {@link SeekableByteChannel} over a device's guest bytes: reads stop at the virtual size, writes must stay
 * within it (qcow2 images do not grow by writing), truncate is not supported. Closing the channel does not close
 * the device.
 */
public final class DeviceChannel implements SeekableByteChannel {
    private final BlockDevice device;
    private final WritableDevice writable;
    private long position;
    private boolean open = true;

    public DeviceChannel(BlockDevice device) {
        this.device = device;
        this.writable = device instanceof WritableDevice w && !(w instanceof Qcow2Image q && q.writer() == null) ? w : null;
    }

    private void ensureOpen() throws ClosedChannelException {
        if (!open) {
            throw new ClosedChannelException();
        }
    }

    @Override
    public synchronized int read(ByteBuffer dst) throws IOException {
        ensureOpen();
        long left = device.size() - position;
        if (left <= 0) {
            return dst.hasRemaining() ? -1 : 0;
        }
        int n = (int) Math.min(dst.remaining(), left);
        ByteBuffer part = dst.slice(dst.position(), n);
        device.read(part, position);
        dst.position(dst.position() + n);
        position += n;
        return n;
    }

    @Override
    public synchronized int write(ByteBuffer src) throws IOException {
        ensureOpen();
        if (writable == null) {
            throw new NonWritableChannelException();
        }
        int n = src.remaining();
        if (n > device.size() - position) {
            throw new IOException(device.name() + ": write of " + n + " bytes at " + position + " past the virtual size "
                    + device.size());
        }
        writable.write(src, position);
        position += n;
        return n;
    }

    @Override
    public synchronized long position() throws IOException {
        ensureOpen();
        return position;
    }

    @Override
    public synchronized SeekableByteChannel position(long newPosition) throws IOException {
        ensureOpen();
        if (newPosition < 0) {
            throw new IllegalArgumentException("negative position");
        }
        position = newPosition;
        return this;
    }

    @Override
    public long size() throws IOException {
        ensureOpen();
        return device.size();
    }

    @Override
    public SeekableByteChannel truncate(long size) throws IOException {
        throw new UnsupportedOperationException("resize the image instead");
    }

    @Override
    public synchronized boolean isOpen() {
        return open;
    }

    @Override
    public synchronized void close() {
        open = false;
    }
}
