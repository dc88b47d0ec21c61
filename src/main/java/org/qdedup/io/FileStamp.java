package org.qdedup.io;

/**
 * The identity of a file's current state as the file system reports it. Files in memory (tests) have only a
 * size and an inode of 0.
 *
 * @param size       bytes
 * @param inode      inode number (a copy or a restore from backup is a new inode)
 * @param ctimeNanos status change time in nanoseconds since the epoch (any write or rename changes it)
 * @param mtimeNanos modification time in nanoseconds since the epoch
 */
public record FileStamp(long size, long inode, long ctimeNanos, long mtimeNanos) {
}
